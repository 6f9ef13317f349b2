"""Integration engine vs Optuna, full factorial and greedy: right subsets per run spent.

On N simulated rounds (`kitchen_sink(seed, noise)` from tests/integrate_sim: eight
contributions with a conflict, a gain that vanishes in combination, a guardrail breach, a
null and a choice group; the true best subset is known), every method decides which
contributions go into the model; a method is right when it picks exactly the true best
subset. Runs are counted the engine's way: one distinct recipe x seed is one run.

* engine: `stacklab integrate` through its external runner (the stand-in trainer).
* full factorial and one-at-a-time greedy: tests/integrate_sim/benchmark.py.
* Optuna (NSGA-II and TPE): one categorical per contribution or choice group, each trial its
  subset on the round's 3 seeds, the round's objectives, the guardrails as constraints;
  final pick at a budget by the engine's utility among the feasible Pareto trials ("best"),
  or by the one-standard-error parsimony rule ("1-SE"). Optuna is scored at each scenario's
  own engine run count, on a sweep of budgets up to `--max-factor` x the engine's mean, and
  by the runs it needs to match the engine's rate (if it ever does within the sweep).

    OMP_NUM_THREADS=1 python benchmarks/engine_search.py [--scenarios 10] [--noise 0.15]
        [--samplers nsga2,tpe] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from integrate_sim.benchmark import (
    OptunaTrial,
    PickRule,
    World,
    every_subset,
    full_factorial,
    greedy,
    optuna_pick,
    optuna_search,
    run_engine,
    true_best,
)
from integrate_sim.scenarios import Scenario, kitchen_sink
from stacklab.integrate.round import Round

RULES: dict[PickRule, str] = {"best": "best utility", "1se": "1-SE parsimony"}
SAMPLER_NAMES = {"nsga2": "NSGA-II", "tpe": "TPE", "random": "random"}
SWEEP = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # budgets, in multiples of the engine's mean runs


@dataclass
class Outcome:
    """Right or wrong, and runs spent, per scenario."""

    found: list[bool] = field(default_factory=list)
    runs: list[int] = field(default_factory=list)

    def add(self, ok: bool, runs: int) -> None:
        self.found.append(ok)
        self.runs.append(runs)

    def summary(self) -> dict[str, Any]:
        return {
            "found": sum(self.found),
            "scenarios": len(self.found),
            "runs_mean": statistics.fmean(self.runs),
            "runs_max": max(self.runs),
            "found_by_scenario": self.found,
            "runs_by_scenario": self.runs,
        }


@dataclass
class Study:
    """One Optuna search on one scenario, to be scored at any budget afterwards."""

    rnd: Round
    world: World
    history: list[OptunaTrial]
    best: frozenset[int]

    def right(self, budget: int, rule: PickRule) -> tuple[bool, int]:
        subset, spent = optuna_pick(self.rnd, self.world, self.history, budget, rule)
        return subset == self.best, spent


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run every method on every scenario; return the results (what --json writes)."""
    samplers = [s for s in args.samplers.split(",") if s]
    first = args.first_scenario
    seeds = range(first, first + args.scenarios)
    methods: dict[str, Outcome] = {"engine": Outcome()}
    scenarios: dict[int, tuple[Scenario, Round]] = {}
    reasons_right = 0
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            scenario = kitchen_sink(seed, args.noise)
            rnd, eng = run_engine(scenario, Path(tmp) / f"s{seed}", args.budget)
            scenarios[seed] = scenario, rnd
            methods["engine"].add(eng.selected == true_best(rnd, scenario), eng.runs)
            reasons_right += eng.reasons_right
            print(f"scenario {seed}: engine right={methods['engine'].found[-1]} runs={eng.runs}")
    timings["engine"] = time.perf_counter() - t0
    engine_runs = dict(zip(seeds, methods["engine"].runs, strict=True))
    mean_runs = statistics.fmean(engine_runs.values())
    max_runs = math.ceil(args.max_factor * mean_runs)

    t0 = time.perf_counter()
    methods["full factorial"], methods["greedy"] = Outcome(), Outcome()
    for scenario, rnd in scenarios.values():
        best = true_best(rnd, scenario)
        world = World(rnd, scenario)
        methods["full factorial"].add(full_factorial(rnd, world) == best, len(world.runs))
        world = World(rnd, scenario)
        methods["greedy"].add(greedy(rnd, world) == best, len(world.runs))
    timings["factorial + greedy"] = time.perf_counter() - t0
    ceiling = {
        rule: f"every subset measured, {label} (ceiling of Optuna's picks)"
        for rule, label in RULES.items()
    }
    for rule in RULES:
        methods[ceiling[rule]] = Outcome()
    for scenario, rnd in scenarios.values():
        world = World(rnd, scenario)
        history = every_subset(rnd, world)
        for rule in RULES:
            subset, spent = optuna_pick(rnd, world, history, len(world.runs), rule)
            methods[ceiling[rule]].add(subset == true_best(rnd, scenario), spent)

    studies: dict[str, list[Study]] = {}
    for sampler in samplers:
        t0 = time.perf_counter()
        studies[sampler] = []
        for seed, (scenario, rnd) in scenarios.items():
            world = World(rnd, scenario)
            history = optuna_search(rnd, world, sampler, max_runs, seed=seed)
            studies[sampler].append(Study(rnd, world, history, true_best(rnd, scenario)))
        timings[f"optuna {sampler}"] = time.perf_counter() - t0
        print(f"optuna {sampler}: {time.perf_counter() - t0:.1f} s")

    n = args.scenarios
    engine_found = sum(methods["engine"].found)
    budgets = sorted({round(f * mean_runs) for f in SWEEP if f <= args.max_factor})
    fine = list(range(3, max_runs + 1, 3))  # every trial's worth of runs (3 seeds)
    sweep: dict[str, dict[int, int]] = {}
    to_match: dict[str, int | None] = {}
    for sampler, runs in studies.items():
        for rule in RULES:
            name = f"optuna {SAMPLER_NAMES[sampler]}, {RULES[rule]}"
            matched = Outcome()
            for study, seed in zip(runs, seeds, strict=True):
                matched.add(*study.right(engine_runs[seed], rule))
            methods[name + " (engine's runs)"] = matched
            sweep[name] = {b: sum(s.right(b, rule)[0] for s in runs) for b in budgets}
            # From which budget on Optuna is as often right as the engine, at every larger one
            # (the first budget where it is would reward a lucky early pick).
            behind = [b for b in fine if sum(s.right(b, rule)[0] for s in runs) < engine_found]
            after = [b for b in fine if b > max(behind, default=0)]
            to_match[name] = after[0] if after else None
    return {
        "benchmark": "engine_search",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
        "command": " ".join(["python", "benchmarks/engine_search.py", *sys.argv[1:]]),
        "config": {
            "scenarios": n,
            "first_scenario": first,
            "noise": args.noise,
            "engine_budget": args.budget,
            "samplers": samplers,
            "max_factor": args.max_factor,
            "optuna": _optuna_version(),
        },
        "engine_mean_runs": mean_runs,
        "engine_reasons_right": reasons_right,
        "methods": {k: v.summary() for k, v in methods.items()},
        "sweep": {k: {str(b): v for b, v in s.items()} for k, s in sweep.items()},
        "runs_to_match_engine": to_match,
        "max_runs": max_runs,
        "seconds": timings,
    }


def _optuna_version() -> str | None:
    try:
        import optuna
    except ImportError:
        return None
    return optuna.__version__


def print_tables(res: dict[str, Any]) -> None:
    """Markdown tables: right subsets at equal budget, the budget sweep, runs to match."""
    cfg, n = res["config"], res["config"]["scenarios"]
    mean = res["engine_mean_runs"]
    print(
        f"\n{n} kitchen-sink scenarios (seeds {cfg['first_scenario']}..), noise sd "
        f"{cfg['noise']}, 3 seeds per recipe, engine budget {cfg['engine_budget']}, "
        f"Optuna {cfg['optuna'] or 'not installed'}\n"
    )
    print("| method | true best subset found | runs per round (mean, max) |")
    print("|---|---|---|")
    for name, m in res["methods"].items():
        print(f"| {name} | {m['found']}/{n} | {m['runs_mean']:.0f}, {m['runs_max']} |")
    print(f"\nEngine: every shelving reason right in {res['engine_reasons_right']}/{n}.")
    if not res["sweep"]:
        return
    budgets = list(next(iter(res["sweep"].values())))
    head = " | ".join(f"{int(b)} ({int(b) / mean:.1f}x)" for b in budgets)
    print(f"\nOptuna's right subsets by budget (runs; engine: {mean:.0f} on average):\n")
    print(f"| method | {head} | runs from which it matches the engine "
          f"({res['methods']['engine']['found']}/{n}) |")  # fmt: skip
    print("|---" * (len(budgets) + 2) + "|")
    for name, row in res["sweep"].items():
        match = res["runs_to_match_engine"][name]
        text = f"{match} ({match / mean:.1f}x)" if match else f"not within {res['max_runs']}"
        print(f"| {name} | " + " | ".join(f"{v}/{n}" for v in row.values()) + f" | {text} |")
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in res["seconds"].items())
    print(f"\nTime: {secs}.")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", type=int, default=10, help="how many scenarios")
    parser.add_argument("--first-scenario", type=int, default=1, help="seed of the first one")
    parser.add_argument("--noise", type=float, default=0.15, help="per-run noise sd of quality")
    parser.add_argument("--budget", type=int, default=200, help="the engine's round budget")
    parser.add_argument(
        "--samplers", default="nsga2,tpe", help="Optuna samplers: nsga2, tpe, random"
    )
    parser.add_argument(
        "--max-factor", type=float, default=4.0, help="Optuna's largest budget / engine's mean"
    )
    parser.add_argument("--quick", action="store_true", help="1 scenario, sweep to 2x (~30 s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.scenarios, args.max_factor = 1, min(args.max_factor, 2.0)
    if _optuna_version() is None:
        print("optuna is not installed (pip install 'optuna>=5'): comparing without it")
        args.samplers = ""
    res = compare(args)
    print_tables(res)
    if args.json:
        res["table"] = bench_rows(res)
        args.json.write_text(json.dumps(res, indent=1))


def bench_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows `stacklab bench` prints: the engine against each other search."""
    n, methods = res["config"]["scenarios"], res["methods"]
    engine = methods["engine"]
    case = f"{n} scenarios, noise {res['config']['noise']}"
    rows = []
    peers = [k for k in methods if k in ("full factorial", "greedy") or k.startswith("optuna")]
    for name in peers:
        m = methods[name]
        rows.append(
            {
                "benchmark": "engine_search",
                "case": f"{case}; {name} at {m['runs_mean']:.0f} runs",
                "unit": "right final subsets",
                "ours": float(engine["found"]),
                "peer": float(m["found"]),
                "peer_name": name.split(" (")[0],
                "ratio": engine["found"] / m["found"] if m["found"] else None,
                "goal": "more right subsets",
                "met": engine["found"] > m["found"],
                "note": f"engine {engine['runs_mean']:.0f} runs on average",
            }
        )
    for name, match in res["runs_to_match_engine"].items():
        rows.append(
            {
                "benchmark": "engine_search",
                "case": f"{case}; runs to match the engine's {engine['found']}/{n}",
                "unit": "runs",
                "ours": float(engine["runs_mean"]),
                "peer": float(match) if match else None,
                "peer_name": name,
                "ratio": match / engine["runs_mean"] if match else None,
                "goal": "fewer runs to equal accuracy",
                "met": match is None or match > engine["runs_mean"],
                "note": "" if match else f"{name} never matched within {res['max_runs']} runs",
            }
        )
    return rows


if __name__ == "__main__":
    main()
