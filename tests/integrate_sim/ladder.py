"""Does a ladder of rungs pick what holds at scale? The engine with and without one, same budget.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.integrate_sim.ladder --scenarios 10

A round that decides on small models is cheap and can be wrong about the large one (a
change that helps a depth-2 model may hurt a depth-4 one); a round on the large model alone
is right about it but buys a quarter as many runs. A ladder (docs/integrate.md, "Decisions
that hold at scale") screens on the small rung and checks the recipe on the large one. This
script measures the trade on `ladder_random(seed)` scenarios (tests/integrate_sim/
scenarios.py: contributions that hold, flip, fade or emerge between rungs s = depth 2 and
m = depth 4), each run through the real engine three ways with the same budget in cost
units:

* ladder: rungs s (cost 1) and m (cost 4);
* m only: one rung, m (cost 4): a quarter as many runs, all at the scale that counts;
* s only: one rung, s (cost 1): every run cheap, none at the scale that counts.

For each it reports how often a contribution's final verdict (in the selected recipe or
not) matches the truth at the largest rung, overall and by pattern, how often the selected
recipe is exactly the best subset there, and the cost units and runs used. The truth is
exact: `best_at` enumerates every subset of the rung's noise-free means (main effects,
pairs, the learning-rate curve), as calibration.py does for its scenarios, and drops
members whose leave-one-out gain is below `min_effect` (the engine's default: half a run's
noise), since a gain too small to keep is not one the engine should be scored on.
The markdown table goes to stdout, progress to stderr. Seeds: 1000 and up by default, as
for the calibration benchmark (the project's tests use seeds below 100).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console

from integrate_sim.calibration import TOL, allowed_subsets
from integrate_sim.objective import lr_penalty
from integrate_sim.scenarios import (
    PATTERNS,
    RUNGS,
    LadderScenario,
    Scenario,
    ladder_random,
    write_round,
)
from stacklab.integrate.engine import integrate
from stacklab.integrate.record import DecisionRecord
from stacklab.integrate.round import RoundError
from stacklab.recipe import get_dotted, load_recipe

# Each mode: the rungs its round names (the budget is the same in cost units for all).
MODES: dict[str, tuple[str, ...]] = {"ladder": ("s", "m"), "m only": ("m",), "s only": ("s",)}
LR_FACTORS = (0.5, 1.0, 2.0)  # the learning rates lr_tuning tries, x the baseline's


# ---------------------------------------------------------------------------- the truth


@cache
def baseline_value(key: str) -> Any:
    """The built-in tiny-grpo recipe's value at a dotted key (what every scenario starts from)."""
    return get_dotted(load_recipe("tiny-grpo").model_dump(mode="json"), key)


def rung_named(scenario: Scenario, name: str) -> dict[str, Any]:
    """The scenario's rung called `name`."""
    for rung in scenario.scales:
        if rung["name"] == name:
            return rung
    raise KeyError(f"no rung {name!r} (rungs: {[r['name'] for r in scenario.scales]})")


def rung_truth(scenario: Scenario, name: str) -> dict[str, dict[str, Any]]:
    """The metrics that are the truth at a rung, picked as objective.py picks them."""
    if not scenario.scale:
        return scenario.metrics
    value = str(rung_named(scenario, name)["patch"].get(scenario.scale["key"]))
    return scenario.scale["metrics"].get(value, scenario.metrics)


def recipe_value(scenario: Scenario, ids: Iterable[str], rung: str, key: str) -> Any:
    """A recipe's value at `key`: the contribution on that sets it, else the rung's, else
    the baseline's (rung patches never set a key a contribution sets)."""
    for cid in ids:
        _, ckey, value = scenario.contributions[cid]
        if ckey == key:
            return value
    patch = rung_named(scenario, rung)["patch"] if scenario.scales else {}
    return patch[key] if key in patch else baseline_value(key)


def true_metric_at(
    scenario: Scenario, ids: Iterable[str], metric: str, rung: str, tuned: bool = False
) -> float:
    """The noise-free mean of `metric` with `ids` on at `rung`, as objective.py computes it.

    `tuned`: the recipe runs at the best of LR_FACTORS x the baseline's learning rate (what
    a round with lr_tuning compares at), so a contribution's own learning rate is moot.
    """
    on = set(ids)
    m = rung_truth(scenario, rung)[metric]
    value = m["base"] + sum(m.get("main", {}).get(f, 0.0) for f in on)
    value += sum(g for a, b, g in m.get("pairs", []) if a in on and b in on)
    if "lr" in m:
        key = m["lr"].get("key", "optim.lr")
        if tuned:
            base = float(baseline_value(key))
            value += max(lr_penalty(m["lr"], f * base, on) for f in LR_FACTORS)
        else:
            value += lr_penalty(m["lr"], recipe_value(scenario, on, rung, key), on)
    for f in on:
        value *= m.get("ratio", {}).get(f, 1.0)
    return float(value)


def true_utility_at(
    scenario: Scenario, ids: Iterable[str], rung: str, tuned: bool = False
) -> float:
    """True utility of `ids` over the baseline at `rung`, in units of each objective's scale
    (else of the rung's run noise, which is what the engine estimates)."""
    on = set(ids)
    truth = rung_truth(scenario, rung)
    total = 0.0
    for o in scenario.objectives:
        metric = o["metric"]
        scale = float(o.get("scale") or truth[metric].get("noise") or 1.0)
        sign = 1.0 if o.get("direction", "max") == "max" else -1.0
        diff = true_metric_at(scenario, on, metric, rung, tuned)
        diff -= true_metric_at(scenario, set(), metric, rung, tuned)
        total += float(o.get("weight", 1.0)) * sign * diff / scale
    return total


def best_at(
    scenario: Scenario, rung: str, min_effect: float = 0.5, tuned: bool = False
) -> frozenset[str]:
    """The best subset at `rung` that is worth keeping, by brute force.

    The highest true utility (ties to the smallest subset), then, while some member's
    leave-one-out gain is below `min_effect` utility units, without the member of the
    smallest such gain: a contribution gaining a fifth of a noise sd is not one the engine
    is wrong to shelve. Scale scenarios have no guardrails, so every subset is feasible.
    """
    if scenario.guardrails:
        raise ValueError("best_at ignores guardrails; scale scenarios have none")
    scored = [(true_utility_at(scenario, s, rung, tuned), s) for s in allowed_subsets(scenario)]
    top = max(u for u, _ in scored)
    best = min((s for u, s in scored if u >= top - TOL), key=lambda s: (len(s), sorted(s)))
    while best:
        full = true_utility_at(scenario, best, rung, tuned)
        gains = {c: full - true_utility_at(scenario, best - {c}, rung, tuned) for c in best}
        weakest = min(sorted(gains), key=lambda c: gains[c])
        if gains[weakest] >= min_effect - TOL:
            break
        best = best - {weakest}
    return best


# ---------------------------------------------------------------------------- one round


@dataclass
class Outcome:
    """One round's verdicts, scored against the truth at the largest rung."""

    mode: str
    seed: int
    selected: frozenset[str]
    best: frozenset[str]
    right: dict[str, bool]  # id -> verdict (selected or not) matches the truth
    patterns: dict[str, str]
    units: float
    runs: int
    seconds: float
    refused: str | None = None  # the engine's RoundError: the budget cannot decide anything
    undecided: int = 0  # contributions the round left undecided (never selected)

    @property
    def exact(self) -> bool:
        return self.selected == self.best


def units_used(decision: DecisionRecord, rungs: Sequence[Mapping[str, Any]]) -> float:
    """Cost units the round used: the ladder's own count, else runs x the one rung's cost."""
    if decision.ladder is not None:
        return decision.ladder.units_used
    return decision.runs.executed * float(rungs[0].get("cost", 1))


def run_mode(
    scenario: LadderScenario, mode: str, root: Path, budget: int, args: argparse.Namespace
) -> Outcome:
    """Run one scenario's round in one mode through the real engine and score it."""
    rungs = [dict(rung_named(scenario, name)) for name in MODES[mode]]
    top = RUNGS[-1]["name"]
    best = best_at(scenario, top)
    folder = root / f"{scenario.seed}-{mode.replace(' ', '-')}"
    round_file = write_round(
        folder / "round",
        scenario,
        budget=budget,
        seeds=args.seeds,
        confirm_seeds=args.confirm_seeds,
        workers=args.workers,
        scales=rungs,
    )
    start = time.perf_counter()
    try:
        result = integrate(round_file, folder / "out", console=Console(quiet=True))
    except RoundError as exc:  # e.g. a rung's share buys fewer runs than screening needs
        return Outcome(
            mode=mode,
            seed=scenario.seed,
            selected=frozenset(),
            best=best,
            right={},
            patterns=scenario.patterns,
            units=0.0,
            runs=0,
            seconds=time.perf_counter() - start,
            refused=str(exc),
        )
    seconds = time.perf_counter() - start
    decision = result.decision
    selected = frozenset(decision.selected)
    right = {c: (c in selected) == (c in best) for c in scenario.contributions}
    return Outcome(
        mode=mode,
        seed=scenario.seed,
        selected=selected,
        best=best,
        right=right,
        patterns=scenario.patterns,
        units=units_used(decision, rungs),
        runs=decision.runs.total,
        seconds=seconds,
        undecided=len(decision.undecided),
    )


# ---------------------------------------------------------------------------- the table


def share(hits: Sequence[bool]) -> str:
    """'k/n (p%)', or '-' for none."""
    if not hits:
        return "-"
    k = sum(hits)
    return f"{k}/{len(hits)} ({100 * k / len(hits):.0f}%)"


def table(outcomes: Sequence[Outcome], budget: int) -> str:
    """The markdown summary: one row per mode."""
    head = ["mode", "rounds", "refused", "verdicts right", *PATTERNS, "exact best", "undecided"]
    head += ["units", "runs", "s"]
    lines = [
        f"Budget {budget} cost units per round (s: cost 1, m: cost 4); truth: rung m.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for mode in MODES:
        tried = [o for o in outcomes if o.mode == mode]
        rows = [o for o in tried if o.refused is None]
        if not tried:
            continue
        refused = len(tried) - len(rows)
        verdicts = [ok for o in rows for ok in o.right.values()]
        by_pattern = [
            share([ok for o in rows for c, ok in o.right.items() if o.patterns[c] == p])
            for p in PATTERNS
        ]
        cells = [
            mode,
            str(len(rows)),
            str(refused),
            share(verdicts),
            *by_pattern,
            share([o.exact for o in rows]),
            str(sum(o.undecided for o in rows)),
            _mean([o.units for o in rows]),
            _mean([o.runs for o in rows]),
            _mean([o.seconds for o in rows]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "verdicts right: contributions whose final verdict (selected or not) matches the",
        "best subset at rung m; by pattern across rungs; exact best: the selected recipe is",
        "that subset; undecided: verdicts left open (counted wrong where the truth selects",
        "them); units, runs, s: means per round (runs: distinct recipe x seed);",
        "refused: rounds the engine would not start (a rung's share buys too few runs),",
        "left out of the other columns.",
    ]
    return "\n".join(lines)


def detail(outcomes: Sequence[Outcome]) -> str:
    """One row per scenario and mode: what was selected against the truth."""
    lines = ["| seed | mode | best at m | selected | wrong |", "|---|---|---|---|---|"]
    for o in sorted(outcomes, key=lambda o: (o.seed, list(MODES).index(o.mode))):
        wrong = [f"{c} ({o.patterns[c]})" for c, ok in sorted(o.right.items()) if not ok]
        chosen = "refused" if o.refused else _ids(o.selected)
        cells = [str(o.seed), o.mode, _ids(o.best), chosen, ", ".join(wrong) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(values: Sequence[float]) -> str:
    return f"{statistics.mean(values):.0f}" if values else "-"


def _ids(ids: Iterable[str]) -> str:
    return "{" + ", ".join(sorted(ids)) + "}"


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.integrate_sim.ladder",
        description="Random scale-ladder scenarios through the engine: a ladder (rungs s and "
        "m) against single-rung rounds at m and at s, at the same budget in cost units; "
        "prints a markdown table of how often verdicts match the truth at m.",
    )
    parser.add_argument("--scenarios", type=int, default=10, help="how many (default 10)")
    parser.add_argument("--first-seed", type=int, default=1000, help="default 1000")
    parser.add_argument(
        "--budget", type=int, default=400, help="cost units per round (default 400)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="screening seeds (default 3)")
    parser.add_argument("--confirm-seeds", type=int, default=3, help="default 3")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        metavar="MODE",
        help=f"which rounds to run (default all: {', '.join(repr(m) for m in MODES)})",
    )
    parser.add_argument("--detail", action="store_true", help="also one row per round")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the round folders here (default: temp)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="ladder-") as tmp:
        root = args.keep or Path(tmp)
        seeds = range(args.first_seed, args.first_seed + args.scenarios)
        for i, seed in enumerate(seeds, 1):
            scenario = ladder_random(seed)
            for mode in args.modes:
                o = run_mode(scenario, mode, root, args.budget, args)
                outcomes.append(o)
                if o.refused:
                    what = f"[{i}/{args.scenarios}] seed {seed} {mode}: refused: {o.refused}"
                    print(what, file=sys.stderr, flush=True)
                    continue
                print(
                    f"[{i}/{args.scenarios}] seed {seed} {mode}: selected {_ids(o.selected)}"
                    f", best at m {_ids(o.best)}, {sum(o.right.values())}/{len(o.right)} "
                    f"right, {o.units:.0f} units, {o.seconds:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    print(table(outcomes, args.budget))
    if args.detail:
        print()
        print(detail(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
