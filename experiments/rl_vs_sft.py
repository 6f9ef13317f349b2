"""Does RL raise held-out accuracy over the SFT model? Seeds, paired differences, 95% CIs.

For each seed, two builds of the same recipe that differ only in `rl.enabled`: the pair
shares the data, pretraining and SFT stages through the cache, so the only difference between
their models is the RL stage. Both are evaluated on the same held-out problems and agent
tasks, so every comparison is paired item by item. Run folders: OUT/seed{S}-sft (RL off) and
OUT/seed{S}-rl (RL on, the full build).

Two intervals per objective, both reported:

* **across seeds**: the mean of the per-seed differences ± t(0.975, n-1) · sd / sqrt(n); it
  carries the full variance of training, and with three seeds it is wide (t = 4.30);
* **paired bootstrap**: resample seeds, then items within each seed (10,000 draws), and take
  the 2.5 and 97.5 percentiles of the mean difference. Resampling a seed's m items with
  replacement only changes how often each distinct difference occurs, so the draw is made
  as a multinomial over those values (vectorized with numpy): the same distribution as
  drawing item by item, far faster.

A second table, **the build per seed**, describes the RL arm's run (the full build): val_bpb
after pretraining, after SFT and at the end, the final-over-pretrained ratio, arithmetic and
agent success (calculator, lookup) of the SFT arm and of the RL arm, and the build's minutes
(the `seconds` each stage's `_COMPLETE.json` recorded when it was built, summed over the
stages of `build.json`; a cached stage counts the time it took when it was built). A mean row
gives mean ± t(0.975, n-1) · sd / sqrt(n) over seeds per column; a missing metric prints "–"
and is left out of the mean. Then the mean minutes per stage group (data = corpus, tokenizer,
shards; pretrain; sft; rl; eval), and the goal lines, each with pass / FAIL and its numbers:

* lookup agent success after RL, mean over seeds ≥ 0.5 (with its t interval);
* arithmetic after RL ≥ 0.5 on every seed (the seeds that miss are listed);
* RL over SFT positive on each agent env of the eval (the t interval's lower bound > 0);
* final val_bpb within 10% of the pretrained val_bpb on every seed (ratio ≤ 1.10).

    python experiments/rl_vs_sft.py --seeds 0 1 2 --out runs/rl_vs_sft [--set KEY=VALUE ...]

Options:

* `--threads N`: `torch.set_num_threads(N)` before building (default: torch's own choice).
* `--report-only`: build nothing; read OUT/seed{S}-{sft,rl} for the given --seeds and write
  the same outputs. Two processes can build different seeds into the same --out and
  --cache-dir (`--seeds 0 2 4` and `--seeds 1 3`), then `--report-only --seeds 0 1 2 3 4`
  makes the table. A missing run folder is a one-line error (exit code 2).
* `--coverage`: a simulation check that the two intervals cover what they claim with the
  seed count used (see `coverage`). Alone, it reads the finished report in OUT/results.json
  and builds nothing; with --report-only it checks the report made in the same run.
  `--coverage-reps` (2000), `--coverage-draws` (bootstrap draws per replication, 1000) and
  `--coverage-seed` (0) set the simulation.

Writes OUT/results.json (one entry per objective, plus "levels", "goals" and, with
--coverage, "coverage") and OUT/results.md (the tables for docs/), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from stacklab.fileio import write_atomic

ARMS = ("sft", "rl")
RESERVED = ("levels", "goals", "coverage")  # results.json keys that are not objectives
MARKER = "_COMPLETE.json"  # a finished stage's record, written by stacklab.pipeline
STAGE_GROUPS = {
    "data": ("corpus", "tokenizer", "shards"),
    "pretrain": ("pretrain",),
    "sft": ("sft",),
    "rl": ("rl",),
    "eval": ("eval",),
}
# Accuracies shown per arm in the levels table: (metric, short label).
LEVEL_ACCURACIES = (
    ("task_acc/arithmetic", "arith"),
    ("agent_success/calculator", "calc"),
    ("agent_success/lookup", "lookup"),
)
COVERAGE_HEADING = "**Interval coverage**"
CONTAINS_TOL = 1e-12  # an interval that is one point (all draws equal) still contains it
Z95 = float(stats.norm.ppf(0.975))


class ReportError(Exception):
    """A problem with the inputs of the report, shown as one line (exit code 2)."""


# --------------------------------------------------------------------------- reading runs


@dataclass
class SeedRuns:
    """One seed's two run folders, their metrics.json and their per-item eval results."""

    seed: int
    dirs: dict[str, Path]
    metrics: dict[str, dict[str, Any]]
    items: dict[str, dict[str, list[float]]]


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


def run_dir(out: Path, seed: int, arm: str) -> Path:
    """Where a seed's arm is built: OUT/seed{S}-{arm}."""
    return out / f"seed{seed}-{arm}"


def load_seed(out: Path, seed: int) -> SeedRuns:
    """Read both arms of `seed`; a missing folder or file is a ReportError naming the path,
    so a report over seeds that were not (all) built says which one instead of a traceback."""
    dirs = {arm: run_dir(out, seed, arm) for arm in ARMS}
    for path in dirs.values():
        if not path.is_dir():
            raise ReportError(f"no run dir {path} (build seed {seed} first or leave it out)")
        for need in (path / "metrics.json", path / "eval" / "completions.jsonl"):
            if not need.is_file():
                raise ReportError(f"run dir {path} is incomplete: no {need}")
    return SeedRuns(
        seed=seed,
        dirs=dirs,
        metrics={arm: json.loads((p / "metrics.json").read_text()) for arm, p in dirs.items()},
        items={arm: outcomes(p) for arm, p in dirs.items()},
    )


def stage_minutes(run: Path) -> dict[str, float | None]:
    """Minutes each stage of `build.json` took when it was built (from its `_COMPLETE.json`
    behind the run's stage link), None where the record is missing; {} without build.json."""
    build_json = run / "build.json"
    if not build_json.is_file():
        return {}
    minutes: dict[str, float | None] = {}
    for entry in json.loads(build_json.read_text())["stages"]:
        record = run / entry["stage"] / MARKER
        seconds = json.loads(record.read_text()).get("seconds") if record.is_file() else None
        minutes[entry["stage"]] = None if seconds is None else float(seconds) / 60
    return minutes


def group_minutes(minutes: dict[str, float | None]) -> dict[str, float | None]:
    """Minutes per STAGE_GROUPS group and in total; None where a stage of it has no record
    (a partial sum would read as a fast build)."""

    def total(names: Sequence[str]) -> float | None:
        values = [minutes[n] for n in names if n in minutes]
        if not values or any(v is None for v in values):
            return None
        return float(sum(v for v in values if v is not None))

    groups = {group: total(names) for group, names in STAGE_GROUPS.items()}
    groups["total"] = total(list(minutes))
    return groups


# --------------------------------------------------------------------------- intervals


def t_interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): mean ± t(0.975, n-1) · sd / sqrt(n); lo, hi are NaN for one value."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sane at 0 and 1, unlike p ± z·se."""
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_diffs(
    diffs: Sequence[np.ndarray], draws: int = 10_000, rng: np.random.Generator | None = None
) -> tuple[float, float]:
    """95% percentile interval of the mean item difference, seeds then items resampled.

    `diffs` holds each seed's per-item differences (RL minus SFT). Each draw picks len(diffs)
    seeds with replacement and, for each, resamples its m items with replacement; the mean
    is over all resampled items. Only the counts of each distinct difference matter, so a
    seed's resample is drawn as a multinomial over those values (as a chain of binomials,
    vectorized over draws): the same distribution as item by item, in O(values) numpy calls.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    sizes = np.array([len(d) for d in diffs])
    values, inverse = np.unique(np.concatenate(diffs), return_inverse=True)
    n_seeds, n_values = len(diffs), len(values)
    cell = np.repeat(np.arange(n_seeds), sizes) * n_values + inverse.ravel()
    counts = np.bincount(cell, minlength=n_seeds * n_values).reshape(n_seeds, n_values)
    at_or_after = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
    # P(value k | not one of the values before k), per seed: the chain of binomials.
    cond = np.divide(counts, at_or_after, out=np.zeros(counts.shape), where=at_or_after > 0)
    picks = rng.integers(n_seeds, size=(draws, n_seeds))
    left = sizes[picks]
    total = np.zeros(picks.shape)
    for k in range(n_values - 1):
        taken = rng.binomial(left, np.minimum(cond[picks, k], 1.0))
        total += taken * values[k]
        left -= taken
    total += left * values[-1]
    means = np.sort(total.sum(axis=1) / sizes[picks].sum(axis=1))
    return float(means[int(0.025 * draws)]), float(means[int(0.975 * draws) - 1])


def bootstrap(
    pairs: list[list[tuple[float, float]]],
    draws: int = 10_000,
    rng: np.random.Generator | None = None,
) -> tuple[float, float]:
    """95% percentile interval of the mean paired difference, seeds then items resampled."""
    diffs = [np.array([b - a for a, b in seed_pairs], dtype=float) for seed_pairs in pairs]
    return bootstrap_diffs(diffs, draws, rng)


# --------------------------------------------------------------------------- the tables


def fmt(value: float | None, spec: str = ".3f") -> str:
    """A table cell: the number, or "–" where it is missing."""
    return "–" if value is None else format(value, spec)


def mean_cell(values: Sequence[float], spec: str = ".3f") -> str:
    """Mean ± t half-width over seeds ("–" for none, the bare mean for one value)."""
    if not values:
        return "–"
    mean, lo, hi = t_interval(values)
    if len(values) < 2:
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format((hi - lo) / 2, spec)}"


def compare(runs: list[SeedRuns]) -> tuple[dict[str, Any], str]:
    """The RL-minus-SFT table: per objective and seed, both rates and the difference, then
    the mean with its t and bootstrap intervals. Returns (results.json entries, markdown)."""
    per_seed: dict[str, list[dict[str, Any]]] = {}
    pairs: dict[str, list[list[tuple[float, float]]]] = {}
    for run in runs:
        before, after = run.items["sft"], run.items["rl"]
        for key in before:
            a, b = before[key], after[key]
            per_seed.setdefault(key, []).append(
                {"seed": run.seed, "sft": sum(a) / len(a), "rl": sum(b) / len(b), "n": len(a)}
            )
            pairs.setdefault(key, []).append(list(zip(a, b, strict=True)))

    results: dict[str, Any] = {}
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
    return results, "\n".join(lines) + "\n"


def level_columns() -> list[tuple[str, str, str]]:
    """The levels table's columns: (results.json key, markdown label, number format)."""
    columns = [
        ("pretrain/val_bpb", "pretrain bpb", ".3f"),
        ("sft/val_bpb", "SFT bpb", ".3f"),
        ("val_bpb", "final bpb", ".3f"),
        ("val_bpb_ratio", "final / pretrain", ".3f"),
    ]
    for metric, label in LEVEL_ACCURACIES:
        columns += [
            (f"sft/{metric}", f"{label} SFT", ".3f"),
            (f"rl/{metric}", f"{label} RL", ".3f"),
        ]
    columns.append(("build_minutes", "build min", ".1f"))
    return columns


def level_row(run: SeedRuns) -> dict[str, Any]:
    """One seed's row of the levels table (None where a metric is missing), with a Wilson
    interval and item count per accuracy and the minutes of every stage and stage group."""
    full = run.metrics["rl"]
    row: dict[str, Any] = {"seed": run.seed}
    for key in ("pretrain/val_bpb", "sft/val_bpb", "val_bpb"):
        row[key] = full.get(key)
    final, pretrained = row["val_bpb"], row["pretrain/val_bpb"]
    row["val_bpb_ratio"] = final / pretrained if final is not None and pretrained else None
    row["wilson_ci95"], row["n_items"] = {}, {}
    for metric, _ in LEVEL_ACCURACIES:
        for arm in ARMS:
            key = f"{arm}/{metric}"
            row[key] = run.metrics[arm].get(metric)
            items = run.items[arm].get(metric)
            if items:
                row["wilson_ci95"][key] = list(wilson(sum(items), len(items)))
                row["n_items"][key] = len(items)
    minutes = stage_minutes(run.dirs["rl"])
    groups = group_minutes(minutes)
    row["build_minutes"] = groups["total"]
    row["stage_minutes"] = {**minutes, **{f"group/{g}": m for g, m in groups.items()}}
    return row


def present(rows: list[dict[str, Any]], key: str) -> list[float]:
    """The values of `key` over rows, missing ones left out."""
    return [r[key] for r in rows if r.get(key) is not None]


def levels(runs: list[SeedRuns]) -> tuple[dict[str, Any], str]:
    """The build-per-seed table and the mean minutes per stage group.

    Returns (results.json["levels"], markdown): one row per seed, then for each column the
    mean over the seeds that have it with its t 95% interval.
    """
    columns = level_columns()
    rows = [level_row(run) for run in runs]
    mean: dict[str, Any] = {}
    for key, _, _ in columns:
        values = present(rows, key)
        if values:
            m, lo, hi = t_interval(values)
            mean[key] = {"mean": m, "t_ci95": [lo, hi], "n_seeds": len(values)}
    group_mean = {}
    for group in [*STAGE_GROUPS, "total"]:
        values = [r["stage_minutes"][f"group/{group}"] for r in rows]
        values = [v for v in values if v is not None]
        group_mean[group] = sum(values) / len(values) if values else None

    lines = [
        "**The build per seed** (the RL arm's run; SFT columns from the RL-off arm; "
        "mean ± t 95% half-width)",
        "",
        "| seed | " + " | ".join(label for _, label, _ in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for r in rows:
        cells = [fmt(r[key], spec) for key, _, spec in columns]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    cells = [mean_cell(present(rows, key), spec) for key, _, spec in columns]
    lines.append("| **mean** | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| minutes per stage: mean over seeds | " + " | ".join([*STAGE_GROUPS, "total"]) + " |",
        "| --- |" + " --- |" * (len(STAGE_GROUPS) + 1),
        "| minutes | " + " | ".join(fmt(v, ".1f") for v in group_mean.values()) + " |",
    ]
    report = {"seeds": rows, "mean": mean, "stage_group_minutes_mean": group_mean}
    return report, "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the goals


def goal(text: str, passed: bool | None, detail: str, **numbers: Any) -> dict[str, Any]:
    """One goal's record: what it asks, pass (None: no data), a readable line, the numbers."""
    return {"goal": text, "pass": passed, "detail": detail, **numbers}


def goal_lookup(rows: list[dict[str, Any]], threshold: float = 0.5) -> dict[str, Any]:
    """Lookup agent success after RL, mean over seeds, at least `threshold`."""
    text = f"lookup agent success after RL, mean over seeds ≥ {threshold}"
    values = present(rows, "rl/agent_success/lookup")
    if not values:
        return goal(text, None, "no lookup episodes in the RL runs")
    mean, lo, hi = t_interval(values)
    detail = f"mean {mean:.3f}, t 95% [{lo:.3f}, {hi:.3f}] over {len(values)} seeds"
    # The mean decides pass; whether the interval clears the threshold is said beside it.
    established = bool(lo >= threshold)
    if mean >= threshold:
        detail += ": interval above it" if established else ": the interval reaches below it"
    return goal(
        text,
        mean >= threshold,
        detail,
        mean=mean,
        t_ci95=[lo, hi],
        n_seeds=len(values),
        interval_clears=established,
    )


def goal_arithmetic(rows: list[dict[str, Any]], threshold: float = 0.5) -> dict[str, Any]:
    """Arithmetic accuracy after RL at least `threshold` on every seed."""
    text = f"arithmetic after RL ≥ {threshold} on every seed"
    per_seed = {r["seed"]: r.get("rl/task_acc/arithmetic") for r in rows}
    missing = [s for s, v in per_seed.items() if v is None]
    misses = {s: v for s, v in per_seed.items() if v is not None and v < threshold}
    parts = [f"seed {s}: {v:.3f}" for s, v in misses.items()] or ["no seed misses"]
    if missing:
        parts.append(f"no data for seeds {', '.join(map(str, missing))}")
    passed = None if len(missing) == len(per_seed) else not misses and not missing
    return goal(
        text, passed, "; ".join(parts), per_seed=per_seed, misses=list(misses), missing=missing
    )


def effect_verdict(mean: float, lo: float) -> str:
    """How an RL-over-SFT effect reads: the sign of the mean and where the t interval lies."""
    if mean <= 0:
        return "not positive"
    return "positive, interval excludes 0" if lo > 0 else "positive mean, interval includes 0"


def goal_agent_effects(results: dict[str, Any]) -> list[dict[str, Any]]:
    """RL over SFT positive, t interval above 0, on each agent env of the eval."""
    found = []
    for key, entry in results.items():
        if not key.startswith("agent_success/"):
            continue
        mean, (lo, hi) = entry["mean_diff"], entry["t_ci95"]
        verdict = effect_verdict(mean, lo)
        detail = f"Δ {mean:+.3f}, t 95% [{lo:+.3f}, {hi:+.3f}]: {verdict}"
        found.append(
            goal(
                f"RL over SFT positive on {key}",
                verdict == "positive, interval excludes 0",
                detail,
                verdict=verdict,
                mean_diff=mean,
                t_ci95=[lo, hi],
            )
        )
    return found or [goal("RL over SFT positive on each agent env", None, "no agent envs")]


def goal_bpb(rows: list[dict[str, Any]], limit: float = 1.10) -> dict[str, Any]:
    """Final val_bpb within 10% of the pretrained one (ratio ≤ `limit`) on every seed."""
    text = f"final val_bpb ≤ {limit:.2f} × pretrained val_bpb on every seed"
    per_seed = {r["seed"]: r.get("val_bpb_ratio") for r in rows}
    values = [v for v in per_seed.values() if v is not None]
    if not values:
        return goal(text, None, "no val_bpb ratios")
    missing = [s for s, v in per_seed.items() if v is None]
    misses = {s: v for s, v in per_seed.items() if v is not None and v > limit}
    mean = sum(values) / len(values)
    parts = [f"mean ratio {mean:.3f}"]
    parts += [f"seed {s}: {v:.3f}" for s, v in misses.items()] or ["no seed misses"]
    if missing:
        parts.append(f"no data for seeds {', '.join(map(str, missing))}")
    passed = not misses and not missing
    return goal(
        text,
        passed,
        "; ".join(parts),
        mean_ratio=mean,
        per_seed=per_seed,
        misses=list(misses),
        missing=missing,
    )


def goals(results: dict[str, Any], level_report: dict[str, Any]) -> tuple[list[Any], str]:
    """Every goal, checked: (results.json["goals"], markdown lines)."""
    rows = level_report["seeds"]
    found = [
        goal_lookup(rows),
        goal_arithmetic(rows),
        *goal_agent_effects(results),
        goal_bpb(rows),
    ]
    word = {True: "pass", False: "FAIL", None: "n/a"}
    lines = ["**Goals**", ""]
    lines += [f"- [{word[g['pass']]}] {g['goal']}: {g['detail']}" for g in found]
    return found, "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- coverage


def simulate_coverage(
    rows: list[dict[str, Any]], reps: int, draws: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Share of simulated experiments whose t and bootstrap intervals contain the true effect.

    The population of seeds is the observed one: each replication draws len(rows) seeds'
    (SFT rate, RL rate, n items) with replacement from `rows`, so the true mean difference is
    the mean of the observed per-seed differences. Each drawn seed's items are then Bernoulli
    outcomes at those rates, n per arm (so each arm's count is binomial(n, rate)); the two
    arms are drawn independently, which ignores any item-level correlation between the arms
    (the real pairs share items, so this makes item noise in the difference somewhat larger
    than in the real data, not smaller). Both intervals are computed by the report's own
    functions, the bootstrap with `draws` draws instead of 10,000 for speed (its percentiles
    are then a little noisier). The coverage estimates carry a Monte Carlo error of about
    sqrt(0.95 · 0.05 / reps) (0.005 at 2000 replications).
    """
    sft = np.array([r["sft"] for r in rows], dtype=float)
    rl = np.array([r["rl"] for r in rows], dtype=float)
    n_items = np.array([r["n"] for r in rows])
    true = float(np.mean(rl - sft))
    n = len(rows)
    t_hits = boot_hits = 0
    for _ in range(reps):
        diffs = []
        for s in rng.integers(n, size=n):
            a = rng.random(n_items[s]) < sft[s]
            b = rng.random(n_items[s]) < rl[s]
            diffs.append(b.astype(float) - a)
        if n >= 2:
            _, lo, hi = t_interval([float(d.mean()) for d in diffs])
            t_hits += bool(lo - CONTAINS_TOL <= true <= hi + CONTAINS_TOL)
        b_lo, b_hi = bootstrap_diffs(diffs, draws, rng)
        boot_hits += bool(b_lo - CONTAINS_TOL <= true <= b_hi + CONTAINS_TOL)
    return {
        "n_seeds": n,
        "n_items": [int(m) for m in n_items],
        "true_diff": true,
        "nominal": 0.95,
        "t": t_hits / reps if n >= 2 else None,
        "bootstrap": boot_hits / reps,
    }


def coverage(
    results: dict[str, Any], reps: int = 2000, draws: int = 1000, seed: int = 0
) -> tuple[dict[str, Any], str]:
    """The coverage check for every objective of a report: (results.json["coverage"], md)."""
    rng = np.random.default_rng(seed)
    per_key = {
        key: simulate_coverage(entry["seeds"], reps, draws, rng)
        for key, entry in results.items()
        if key not in RESERVED
    }
    lines = [
        f"{COVERAGE_HEADING} (simulated: {reps} replications, seeds resampled from the "
        f"observed ones, items binomial; bootstrap with {draws} draws)",
        "",
        "| objective | n seeds | nominal | t coverage | bootstrap coverage |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, c in per_key.items():
        lines.append(
            f"| {key} | {c['n_seeds']} | {c['nominal']:.2f} | {fmt(c['t'])} | "
            f"{c['bootstrap']:.3f} |"
        )
    report = {"reps": reps, "bootstrap_draws": draws, "seed": seed, "objectives": per_key}
    return report, "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def build_seeds(args: argparse.Namespace) -> None:
    """Build both arms of every seed (stacklab's builder and torch load only here, so
    --report-only and --coverage start fast)."""
    import torch

    from stacklab.pipeline import build
    from stacklab.recipe import load_recipe
    from stacklab.stages import STAGES

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for seed in args.seeds:
        for arm, rl in (("sft", "false"), ("rl", "true")):
            overrides = [*args.overrides, f"seed={seed}", f"rl.enabled={rl}"]
            recipe = load_recipe(args.recipe, overrides)
            build(recipe, run_dir(args.out, seed, arm), STAGES, args.cache_dir)


def report(out: Path, seeds: list[int]) -> tuple[dict[str, Any], str]:
    """Read the run folders of `seeds` and make every table: (results.json, results.md)."""
    runs = [load_seed(out, seed) for seed in seeds]
    results, table = compare(runs)
    results["levels"], level_md = levels(runs)
    results["goals"], goal_md = goals(results, results["levels"])
    return results, "\n".join([table, level_md, goal_md])


def read_report(out: Path) -> tuple[dict[str, Any], str]:
    """A finished report from OUT: results.json and results.md without its coverage part."""
    path = out / "results.json"
    if not path.is_file():
        raise ReportError(f"no report {path} (run with --report-only first)")
    md_path = out / "results.md"
    md = md_path.read_text() if md_path.is_file() else ""
    return json.loads(path.read_text()), md.split(COVERAGE_HEADING)[0].rstrip("\n") + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/rl_vs_sft"))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads before building"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="build nothing; report on OUT/seed{S}-{arm}"
    )
    parser.add_argument(
        "--coverage",
        action="store_true",
        help="simulate the intervals' coverage; alone: of OUT/results.json, building nothing",
    )
    parser.add_argument("--coverage-reps", type=int, default=2000)
    parser.add_argument("--coverage-draws", type=int, default=1000)
    parser.add_argument("--coverage-seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.coverage and not args.report_only:
            results, md = read_report(args.out)
            shown = ""
        else:
            if not args.report_only:
                build_seeds(args)
            results, md = report(args.out, args.seeds)
            shown = md
        if args.coverage:
            results["coverage"], coverage_md = coverage(
                results, args.coverage_reps, args.coverage_draws, args.coverage_seed
            )
            md = "\n".join([md, coverage_md])
            shown = "\n".join([shown, coverage_md]) if shown else coverage_md
    except ReportError as exc:
        print(f"rl_vs_sft: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(args.out / "results.md", md)
    print(shown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
