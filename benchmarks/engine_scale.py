"""Integration engine at scale: wall time and peak memory of one round as contributions grow.

Why: a round used to score every allowed subset of its n contributions over every bootstrap
draw, which is 2^n subsets: minutes and hundreds of megabytes at n = 16, and a refusal past
65536 subsets (n = 17 without choice groups). `select.search_candidates` replaces that with a
search of the fitted model; this script measures what a whole round costs at a given n, so
the effect of such changes (and any regression) shows as numbers, not impressions.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_scale.py [--sizes 8,16,30]
        [--workers 2] [--timeout 1800] [--keep DIR]

For each size n, a simulated round (tests/integrate_sim: `Scenario`, `write_round`, and the
stand-in trainer objective.py as the external runner, a few milliseconds per run):

* n contributions, each setting its own numeric key of the built-in "tiny" recipe to its own
  value (`KEYS`: no two share a key, so there are no choice groups, and every pair combines
  into a valid recipe). The stand-in trainer reads them purely as switches.
* 4 real gains in "quality" (+0.8, +0.6, +0.5, +0.4), the other n - 4 are nulls (no effect);
  run noise sd 0.1, seed-to-seed shift sd 0.3 (shared by every recipe on a seed).
* 3 seeds, 3 confirmation seeds, budget 10 n + 80 runs (screening alone takes 6 n + 6).

Each size runs in a fresh subprocess of this script (`--one N`), so each peak RSS is that
round's alone: ru_maxrss of the engine process (its trainer subprocesses are not counted).
Reported per size: engine wall time (`integrate(...)` end to end, reports included), peak
RSS, runs used (decision["runs"]["total"]), contributions accepted, how many of those are
nulls (a null accepted is a false discovery; a gain missed is lost power) and, where the
decision lists them, how many were left undecided. A size the engine refuses, or that fails
or times out, gets a row saying so.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# Recipe key, a value that differs from the built-in tiny recipe (and the schema default), and the
# area. Keys without cross-field validators, so any combination stays a valid recipe.
KEYS: list[tuple[str, Any, str]] = [
    ("optim.lr", 0.006, "optimizer"),
    ("model.qk_norm", False, "architecture"),
    ("optim.warmup_steps", 40, "optimizer"),
    ("pretrain.batch_size", 32, "systems"),
    ("optim.muon.lr", 0.03, "optimizer"),
    ("pretrain.grad_accum", 2, "systems"),
    ("pretrain.ckpt_every", 100, "systems"),
    ("pretrain.log_every", 20, "systems"),
    ("sft.weight_decay", 0.01, "optimizer"),
    ("sft.warmup_steps", 20, "optimizer"),
    ("sft.grad_clip", 0.5, "optimizer"),
    ("sft.ckpt_every", 100, "systems"),
    ("sft.log_every", 20, "systems"),
    ("sft.agent_examples", 500, "agent"),
    ("sft.task_examples", 16000, "data"),
    ("sft.batch_size", 16, "systems"),
    ("rl.temperature", 0.9, "rl"),
    ("rl.kl_coef", 0.01, "rl"),
    ("rl.epochs", 2, "rl"),
    ("rl.lr", 2.0e-5, "rl"),
    ("rl.warmup_steps", 8, "rl"),
    ("rl.grad_clip", 0.5, "rl"),
    ("rl.ckpt_every", 20, "rl"),
    ("rl.max_sampling_rounds", 4, "rl"),
    ("rl.overlong_buffer", 8, "rl"),
    ("eval.batch_size", 32, "systems"),
    ("eval.task_problems", 400, "data"),
    ("eval.agent_tasks", 150, "agent"),
    ("eval.pass_k_samples", 16, "systems"),
    ("eval.pass_k_problems", 60, "systems"),
    ("eval.agent_max_turns", 5, "agent"),
    ("tokenizer.min_frequency", 3, "data"),
]
GAINS = [0.8, 0.6, 0.5, 0.4]  # quality gains of the first contributions; the rest are nulls
NOISE, SEED_SD = 0.1, 0.3


def budget_for(n: int) -> int:
    """Runs granted to a round of n contributions: linear in n (screening is 6 n + 6)."""
    return 10 * n + 80


def contribution_id(k: int) -> str:
    return f"gain-{k:02d}" if k < len(GAINS) else f"null-{k:02d}"


def scenario(n: int):
    """n contributions on distinct recipe keys: the first len(GAINS) help, the rest do nothing."""
    from integrate_sim.scenarios import Scenario

    if not 1 <= n <= len(KEYS):
        raise SystemExit(f"size {n}: this script has recipe keys for 1..{len(KEYS)} contributions")
    chosen = KEYS[:n]
    ids = [contribution_id(k) for k in range(n)]
    main = {cid: (GAINS[k] if k < len(GAINS) else 0.0) for k, cid in enumerate(ids)}
    patches = {cid: (area, key, value) for cid, (key, value, area) in zip(ids, chosen, strict=True)}
    return Scenario(
        contributions=patches,
        metrics={"quality": {"base": 10.0, "main": main, "noise": NOISE, "seed_sd": SEED_SD}},
        objectives=[{"metric": "quality", "direction": "max", "weight": 1.0}],
        best={cid for cid in ids if main[cid] > 0},
    )


def run_one(n: int, workers: int, keep: Path | None) -> dict[str, Any]:
    """One round of n contributions in this process: what the table reports for it."""
    from rich.console import Console

    from integrate_sim.scenarios import write_round
    from stacklab.integrate.engine import integrate
    from stacklab.integrate.select import count_subsets

    with tempfile.TemporaryDirectory(prefix=f"engine-scale-{n}-") as tmp:
        root = (keep / f"n{n}") if keep else Path(tmp)
        budget = budget_for(n)
        round_file = write_round(root, scenario(n), budget=budget, seeds=3, workers=workers)
        row: dict[str, Any] = {"n": n, "budget": budget, "subsets": count_subsets(n, [])}
        start = time.perf_counter()
        try:
            integrate(round_file, root / "out", console=Console(file=io.StringIO()))
        except Exception as exc:  # a refusal or failure is a result of this benchmark too
            row["status"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        else:
            decision = json.loads((root / "out" / "decision.json").read_text())
            selected = list(decision["selected"])
            row["status"] = "ok"
            row["runs"] = int(decision["runs"]["total"])
            row["accepted"] = len(selected)
            row["nulls"] = sum(cid.startswith("null-") for cid in selected)
            row["gains"] = sum(cid.startswith("gain-") for cid in selected)
            if "undecided" in decision:  # not every engine version says so
                row["undecided"] = len(decision["undecided"])
        row["wall_s"] = time.perf_counter() - start
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
        return row


def run_size(n: int, workers: int, timeout: float, keep: Path | None) -> dict[str, Any]:
    """Run one size in a fresh subprocess of this script, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--one", str(n), "--workers", str(workers)]
    if keep:
        cmd += ["--keep", str(keep)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"n": n, "budget": budget_for(n), "status": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {
            "n": n,
            "budget": budget_for(n),
            "status": f"exit {proc.returncode}: {err}",
            "wall_s": time.perf_counter() - start,
        }
    return json.loads(lines[-1])


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the results."""

    def cell(row: dict[str, Any], key: str, fmt: str = "{}") -> str:
        return fmt.format(row[key]) if key in row else "-"

    head = (
        "| n | allowed subsets | budget | engine wall s | peak RSS MB | runs used "
        "| accepted | nulls accepted | gains accepted | undecided | status |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["n"]),
                    cell(r, "subsets"),
                    cell(r, "budget"),
                    cell(r, "wall_s", "{:.1f}"),
                    cell(r, "peak_rss_mb", "{:.0f}"),
                    cell(r, "runs"),
                    cell(r, "accepted"),
                    cell(r, "nulls"),
                    f"{r['gains']} of {min(len(GAINS), r['n'])}" if "gains" in r else "-",
                    cell(r, "undecided"),
                    str(r.get("status", "-")).replace("|", "/"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run as: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_scale.py",
    )
    parser.add_argument(
        "--sizes",
        default="8,16,30",
        help=f"comma-separated numbers of contributions, each 1..{len(KEYS)} (default 8,16,30)",
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel runs (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds allowed per size (default 1800)"
    )
    parser.add_argument("--keep", type=Path, help="keep each round's folder under this folder")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one size, JSON out
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.workers, args.keep)))
        return 0
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    bad = [n for n in sizes if not 1 <= n <= len(KEYS)]
    if bad:
        parser.error(f"--sizes: {bad[0]} is not in 1..{len(KEYS)}")
    rows = []
    for n in sizes:
        print(f"n = {n}: running (budget {budget_for(n)} runs)...", file=sys.stderr, flush=True)
        rows.append(run_size(n, args.workers, args.timeout, args.keep))
        print(f"n = {n}: {rows[-1].get('status')}", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
