"""Measure the chartrainer example's contributions, each alone (and any combination) vs main.

    python examples/measure_chartrainer.py                  # every contribution alone, seeds 0-4
    python examples/measure_chartrainer.py --workers 2 --ref deeper+gelu+bigger-lr \
        gelu+bigger-lr deeper+bigger-lr deeper+gelu          # leave-one-outs of a recipe

Builds the repository with make_trainer_repo.py in a temporary folder, exports each variant's
tree (main with the named branches merged in, plus `key=value` patches of train.toml), runs
`train.py` on every seed and prints, per variant, the mean of val_loss, the mean paired
difference to main and the seed-to-seed sd of that difference, and the time per run. Needs
`python` with torch (this interpreter runs the trainer). Standard library and the git CLI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_trainer_repo import BRANCHES, git_env, make_repo, run_git

# The round's pure-patch contribution (examples/chartrainer_round/no-dropout.yaml).
PATCHES = {"no-dropout": {"model.dropout": "0.0"}}


def set_toml_key(text: str, dotted: str, value: str) -> str:
    """`text` with `section.key = value` (one level of table), keeping the line's comment."""
    section, key = dotted.split(".")
    out, current, done = [], None, False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[]")
        elif current == section and stripped.split("=")[0].strip() == key:
            comment = line[line.index("#") :] if "#" in line else "\n"
            line = f"{key} = {value}".ljust(len(line) - len(comment)) + comment
            done = True
        out.append(line)
    if not done:
        raise SystemExit(f"no key {dotted} in train.toml")
    return "".join(out)


def export(repo: Path, variant: str, dest: Path) -> Path:
    """Check out main + the variant's branches (merged in order) + its patches under dest."""
    parts = [p for p in variant.split("+") if p != "main"]
    branches = [p for p in parts if p not in PATCHES]
    env = git_env("Measure <measure@example.org>", "2026-02-01T12:00:00+00:00")
    tree = dest / variant
    run_git(repo, env, "worktree", "add", "--quiet", "--detach", str(tree), "main")
    for branch in branches:
        run_git(tree, env, "merge", "--quiet", "--no-edit", branch)
    config = tree / "train.toml"
    for part in parts:
        for key, value in PATCHES.get(part, {}).items():
            config.write_text(set_toml_key(config.read_text(), key, value))
    return tree


def run(tree: Path, seed: int, out: Path) -> dict:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "train.py", "--config", "train.toml", "--seed", str(seed), "--out", out],
        cwd=tree,
        check=True,
        capture_output=True,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="a+b: branches/patches together")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ref", default="main", help="the variant differences are taken to")
    args = parser.parse_args()
    others = args.variants or [b.name for b in BRANCHES] + list(PATCHES)
    variants = [args.ref, *(v for v in others if v != args.ref)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_repo(tmp / "repo")
        trees = {v: export(tmp / "repo", v, tmp / "trees") for v in variants}
        jobs = [(v, s) for v in variants for s in range(args.seeds)]

        def one(job: tuple[str, int]) -> dict:
            variant, seed = job
            return run(trees[variant], seed, tmp / "out" / f"{variant}-{seed}")

        with ThreadPoolExecutor(args.workers) as pool:
            results = dict(zip(jobs, pool.map(one, jobs), strict=True))
    base = [results[args.ref, s]["val_loss"] for s in range(args.seeds)]
    print(
        f"{'variant':32} {'val_loss':>9} {'diff':>9} {'sd(diff)':>9} {'diff/sd':>8} "
        f"{'tok/s':>8} {'run s':>6}"
    )
    for v in variants:
        losses = [results[v, s]["val_loss"] for s in range(args.seeds)]
        diffs = [a - b for a, b in zip(losses, base, strict=True)]
        sd = statistics.stdev(diffs)
        ratio = f"{statistics.mean(diffs) / sd:8.1f}" if sd > 0 else f"{'-':>8}"
        tps = statistics.median(results[v, s]["tokens_per_s"] for s in range(args.seeds))
        wall = statistics.mean(results[v, s]["wall_s"] for s in range(args.seeds))
        print(
            f"{v:32} {statistics.mean(losses):9.4f} {statistics.mean(diffs):+9.4f} "
            f"{sd:9.4f} {ratio} {tps:8.0f} {wall:6.2f}"
        )
    print(
        "per seed:",
        json.dumps(
            {v: [round(results[v, s]["val_loss"], 4) for s in range(args.seeds)] for v in variants}
        ),
    )


if __name__ == "__main__":
    main()
