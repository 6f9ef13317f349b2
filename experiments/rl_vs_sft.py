"""Does RL raise held-out accuracy over the SFT model? Seeds, paired differences, 95% CIs.

For each seed, two builds of the same recipe that differ only in `rl.enabled`: the pair
shares the data, pretraining and SFT stages through the cache, so the only difference between
their models is the RL stage. Both are evaluated on the same held-out problems and agent
tasks, so every comparison is paired item by item.

Two intervals per objective, both reported:

* **across seeds**: the mean of the per-seed differences ± t(0.975, n-1) · sd / sqrt(n); it
  carries the full variance of training, and with three seeds it is wide (t = 4.30);
* **paired bootstrap**: resample seeds, then items within each seed (10,000 draws), and take
  the 2.5 and 97.5 percentiles of the mean difference.

    python experiments/rl_vs_sft.py --seeds 0 1 2 --out runs/rl_vs_sft [--set KEY=VALUE ...]

Writes OUT/results.json and OUT/results.md (the table for docs/), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

from scipy import stats

from stacklab.fileio import write_atomic
from stacklab.pipeline import build
from stacklab.recipe import load_recipe
from stacklab.stages import STAGES


def outcomes(run: Path) -> dict[str, list[float]]:
    """Per-item results of a run's eval: `task_acc/<task>` and `agent_success/<env>`."""
    items: dict[str, list[float]] = {}
    for line in (run / "eval" / "completions.jsonl").read_text().splitlines():
        row = json.loads(line)
        items.setdefault(f"task_acc/{row['task']}", []).append(float(row["correct"]))
    episodes = run / "eval" / "agent_episodes.jsonl"
    if episodes.is_file():
        for line in episodes.read_text().splitlines():
            row = json.loads(line)
            items.setdefault(f"agent_success/{row['env']}", []).append(float(row["reward"] > 0))
    return items


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def bootstrap(pairs: list[list[tuple[float, float]]], draws: int = 10_000) -> tuple[float, float]:
    """95% percentile interval of the mean paired difference, seeds then items resampled."""
    rng = random.Random(0)
    means = []
    for _ in range(draws):
        total = count = 0.0
        for seed_pairs in (rng.choice(pairs) for _ in pairs):
            for _ in seed_pairs:
                a, b = seed_pairs[rng.randrange(len(seed_pairs))]
                total += b - a
                count += 1
        means.append(total / count)
    means.sort()
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/rl_vs_sft"))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    per_seed: dict[str, list[dict[str, Any]]] = {}
    pairs: dict[str, list[list[tuple[float, float]]]] = {}
    for seed in args.seeds:
        runs = {}
        for arm, rl in (("sft", "false"), ("rl", "true")):
            overrides = [*args.overrides, f"seed={seed}", f"rl.enabled={rl}"]
            recipe = load_recipe(args.recipe, overrides)
            runs[arm] = args.out / f"seed{seed}-{arm}"
            build(recipe, runs[arm], STAGES, args.cache_dir)
        before, after = outcomes(runs["sft"]), outcomes(runs["rl"])
        for key in before:
            a, b = before[key], after[key]
            per_seed.setdefault(key, []).append(
                {"seed": seed, "sft": sum(a) / len(a), "rl": sum(b) / len(b), "n": len(a)}
            )
            pairs.setdefault(key, []).append(list(zip(a, b, strict=True)))

    results = {}
    lines = [
        "| objective | seed | SFT | SFT+RL | Δ | n items |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, rows in per_seed.items():
        diffs = [r["rl"] - r["sft"] for r in rows]
        mean, lo, hi = t_interval(diffs)
        b_lo, b_hi = bootstrap(pairs[key])
        results[key] = {
            "seeds": rows,
            "mean_diff": mean,
            "t_ci95": [lo, hi],
            "bootstrap_ci95": [b_lo, b_hi],
        }
        for r in rows:
            lines.append(
                f"| {key} | {r['seed']} | {r['sft']:.3f} | {r['rl']:.3f} | "
                f"{r['rl'] - r['sft']:+.3f} | {r['n']} |"
            )
        lines.append(
            f"| **{key}** | mean | {sum(r['sft'] for r in rows) / len(rows):.3f} | "
            f"{sum(r['rl'] for r in rows) / len(rows):.3f} | **{mean:+.3f}** | "
            f"t 95% [{lo:+.3f}, {hi:+.3f}]; bootstrap 95% [{b_lo:+.3f}, {b_hi:+.3f}] |"
        )
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(args.out / "results.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
