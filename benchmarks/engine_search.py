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

Calibration mode (`--calibration`): can the engine's word be trusted, not just its pick on
one structure? On N random scenarios (tests/integrate_sim/calibration.py: 8-12
contributions mixing real gains, nulls, a conflict, a vanishing gain, a guardrail breach, a
choice group, a synergy pair and a trade-off between two objectives; exact truth), the
engine decides at 1x, 2x and 4x a run budget; each decision is scored (exact best subset,
a subset as good, nulls and vanishing gains accepted, power, undecided), and every interval
it gives as evidence is checked against the true value (coverage, by level and kind).
Optuna TPE / NSGA-II pick at the same budgets; the full factorial runs at its own cost.

    OMP_NUM_THREADS=1 python benchmarks/engine_search.py --calibration [--scenarios 20]
        [--first-scenario 1000] [--budgets 160,320,640] [--samplers tpe,nsga2]
        [--margin M] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import io
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

from rich.console import Console

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
from integrate_sim.calibration import (
    ROLES,
    coverage_table,
    feasible,
    random_scenario,
    score_decision,
    true_utility,
)
from integrate_sim.objective import simulate
from integrate_sim.scenarios import Scenario, kitchen_sink, write_round
from stacklab.integrate.contributions import apply_subset
from stacklab.integrate.engine import integrate
from stacklab.integrate.round import Round, load_round

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
    parser.add_argument(
        "--scenarios", type=int, help="how many scenarios (default 10; calibration: 20)"
    )
    parser.add_argument(
        "--first-scenario", type=int, help="seed of the first one (default 1; calibration: 1000)"
    )
    parser.add_argument("--noise", type=float, default=0.15, help="per-run noise sd of quality")
    parser.add_argument("--budget", type=int, default=200, help="the engine's round budget")
    parser.add_argument(
        "--samplers",
        help="Optuna samplers: nsga2, tpe, random (default nsga2,tpe; calibration: tpe,nsga2)",
    )
    parser.add_argument(
        "--max-factor", type=float, default=4.0, help="Optuna's largest budget / engine's mean"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 scenario, sweep to 2x (~30 s); calibration: 2 scenarios, budget 160 only",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--calibration", action="store_true", help="random scenarios: coverage and verdicts"
    )
    parser.add_argument(
        "--budgets", default="160,320,640", help="calibration: engine budgets (1x, 2x, 4x)"
    )
    parser.add_argument(
        "--margin", type=float, help="calibration: the round's margin (default: the engine's)"
    )
    args = parser.parse_args()
    if args.calibration:
        calibration_main(args)
        return
    args.scenarios = 10 if args.scenarios is None else args.scenarios
    args.first_scenario = 1 if args.first_scenario is None else args.first_scenario
    args.samplers = "nsga2,tpe" if args.samplers is None else args.samplers
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


# ---------------------------------------------------------------------- calibration mode

GOAL_COVERAGE = (0.93, 0.97)  # for nominal 95% intervals
GOAL_FALSE_ACCEPT = 0.05  # nulls and vanishing gains accepted, per such contribution
GOAL_EXACT = 0.90  # exact best subset at 1x


class CachedWorld(World):
    """`World` with each subset's recipe built once, not once per seed: the full factorial
    of 12 contributions asks for 4096 subsets x 3 seeds."""

    def __init__(self, rnd: Round, scenario: Scenario):
        super().__init__(rnd, scenario)
        self._recipes: dict[frozenset[int], dict[str, Any]] = {}

    def metrics(self, subset: frozenset[int], seed: int) -> dict[str, float]:
        if (subset, seed) not in self.runs:
            if subset not in self._recipes:
                ids = {self.rnd.ids[i] for i in subset}
                recipe = apply_subset(self.rnd.baseline, self.rnd.contributions, ids)
                self._recipes[subset] = recipe.to_dict()
            recipe = {**self._recipes[subset], "seed": seed}
            self.runs[subset, seed] = simulate(recipe, seed, self.truth)
        return self.runs[subset, seed]


def _pick_score(scenario: Scenario, rnd: Round, subset: frozenset[int]) -> dict[str, Any]:
    """Exact best / as good as the best, for a subset of round indices."""
    ids = {rnd.ids[i] for i in subset}
    best_utility = true_utility(scenario, scenario.best)
    return {
        "selected": sorted(ids),
        "exact_best": ids == set(scenario.best),
        "optimal_utility": feasible(scenario, ids)
        and true_utility(scenario, ids) >= best_utility - 1e-9,
    }


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Engine, Optuna and the full factorial on every scenario; the scores (what --json
    writes, less the summaries `summarize` adds)."""
    budgets = [int(b) for b in args.budgets.split(",") if b]
    samplers = [s for s in args.samplers.split(",") if s]
    seeds = range(args.first_scenario, args.first_scenario + args.scenarios)
    extra = {} if args.margin is None else {"margin": args.margin}
    scenarios: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stacklab-calibration-") as tmp:
        for seed in seeds:
            t0 = time.perf_counter()
            scenario = random_scenario(seed)
            record: dict[str, Any] = {
                "seed": seed,
                "roles": scenario.roles,
                "objectives": scenario.objectives,
                "guardrails": scenario.guardrails,
                "best": sorted(scenario.best),
                "engine": {},
                "optuna": {},
            }
            rnd: Round | None = None
            for budget in budgets:
                root = Path(tmp) / f"s{seed}-b{budget}"
                round_file = write_round(
                    root, scenario, budget, seeds=3, confirm_seeds=3, workers=2, **extra
                )
                rnd = load_round(round_file)
                t_engine = time.perf_counter()
                integrate(round_file, root / "out", Console(file=io.StringIO()))
                decision = json.loads((root / "out" / "decision.json").read_text())
                score = score_decision(scenario, decision)
                score["seconds"] = time.perf_counter() - t_engine
                record["engine"][str(budget)] = score
            assert rnd is not None
            for sampler in samplers:
                world = CachedWorld(rnd, scenario)
                history = optuna_search(rnd, world, sampler, max(budgets), seed=seed)
                picks: dict[str, dict[str, Any]] = {}
                for budget in budgets:
                    for rule in RULES:
                        subset, spent = optuna_pick(rnd, world, history, budget, rule)
                        picks[f"{budget}/{rule}"] = {
                            **_pick_score(scenario, rnd, subset),
                            "runs": spent,
                        }
                record["optuna"][sampler] = picks
            world = CachedWorld(rnd, scenario)
            t_ff = time.perf_counter()
            chosen = full_factorial(rnd, world)
            record["factorial"] = {
                **_pick_score(scenario, rnd, chosen),
                "runs": len(world.runs),
                "seconds": time.perf_counter() - t_ff,
            }
            record["seconds"] = time.perf_counter() - t0
            scenarios.append(record)
            _progress(record, budgets, samplers, time.perf_counter() - t_start)
    return {
        "benchmark": "engine_search_calibration",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
        "command": " ".join(["python", "benchmarks/engine_search.py", *sys.argv[1:]]),
        "config": {
            "scenarios": args.scenarios,
            "first_scenario": args.first_scenario,
            "budgets": budgets,
            "samplers": samplers,
            "seeds": 3,
            "confirm_seeds": 3,
            "workers": 2,
            "margin": args.margin,
            "optuna": _optuna_version(),
        },
        "scenarios": scenarios,
        "seconds": time.perf_counter() - t_start,
    }


def _progress(record: dict[str, Any], budgets: list[int], samplers: list[str], t: float) -> None:
    roles = list(record["roles"].values())
    mix = ", ".join(f"{roles.count(r)} {r}" for r in ROLES if r in roles)
    mark = {True: "yes", False: "no"}
    parts = []
    for b in budgets:
        e = record["engine"][str(b)]
        parts.append(
            f"engine@{b} exact {mark[e['exact_best']]} optimal {mark[e['optimal_utility']]} "
            f"runs {e['runs']} {e['seconds']:.0f}s"
        )
    for sampler in samplers:
        p = record["optuna"][sampler][f"{budgets[0]}/best"]
        parts.append(f"{sampler}@{budgets[0]} exact {mark[p['exact_best']]}")
    ff = record["factorial"]
    parts.append(f"factorial exact {mark[ff['exact_best']]} ({ff['runs']} runs)")
    print(f"scenario {record['seed']} ({mix}; {t:.0f}s so far): " + "; ".join(parts), flush=True)


def _rate(k: float, n: float) -> float | None:
    return k / n if n else None


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Per-budget rates, Optuna and factorial rows, coverage and the goals (added to res)."""
    budgets, n = res["config"]["budgets"], len(res["scenarios"])
    engine: dict[str, dict[str, Any]] = {}
    coverage: dict[str, dict[str, Any]] = {}
    for b in map(str, budgets):
        scores = [s["engine"][b] for s in res["scenarios"]]
        intervals = [rec for sc in scores for rec in sc["intervals"]]
        runs = [sc["runs"] for sc in scores]
        nv = sum(sc["null_vanishing_total"] for sc in scores)
        accepted_by_role = {
            role: [
                sum(
                    c["status"] == "accepted"
                    for c in sc["contributions"].values()
                    if c["role"] == role
                )
                for sc in scores
            ]
            for role in ROLES
        }
        totals_by_role = {
            role: sum(c["role"] == role for sc in scores for c in sc["contributions"].values())
            for role in ROLES
        }
        engine[b] = {
            "scenarios": n,
            "decisions": sum(len(sc["contributions"]) for sc in scores),
            "exact_best": sum(sc["exact_best"] for sc in scores),
            "optimal_utility": sum(sc["optimal_utility"] for sc in scores),
            "null_or_vanishing_accepted": sum(sc["null_or_vanishing_accepted"] for sc in scores),
            "null_vanishing_total": nv,
            "false_accept_rate": _rate(sum(sc["null_or_vanishing_accepted"] for sc in scores), nv),
            "best_accepted": sum(sc["best_accepted"] for sc in scores),
            "best_size": sum(sc["best_size"] for sc in scores),
            "real_accepted": sum(sc["real_accepted"] for sc in scores),
            "real_total": sum(sc["real_total"] for sc in scores),
            "undecided": sum(sc["undecided"] for sc in scores),
            "runs_mean": statistics.fmean(runs),
            "runs_max": max(runs),
            "seconds_mean": statistics.fmean(sc["seconds"] for sc in scores),
            "accepted_by_role": {r: sum(v) for r, v in accepted_by_role.items()},
            "role_totals": totals_by_role,
        }
        coverage[b] = {
            "by_level": coverage_table(intervals, "level"),
            "by_comparison": coverage_table(intervals, "comparison"),
            "by_quantity": coverage_table(intervals, "quantity"),
        }
    optuna: dict[str, dict[str, dict[str, float]]] = {}
    for sampler in res["config"]["samplers"]:
        for rule in RULES:
            name = f"optuna {SAMPLER_NAMES.get(sampler, sampler)}, {RULES[rule]}"
            optuna[name] = {}
            for b in budgets:
                picks = [s["optuna"][sampler][f"{b}/{rule}"] for s in res["scenarios"]]
                optuna[name][str(b)] = {
                    "exact_best": sum(p["exact_best"] for p in picks),
                    "optimal_utility": sum(p["optimal_utility"] for p in picks),
                    "runs_mean": statistics.fmean(p["runs"] for p in picks),
                }
    ff = [s["factorial"] for s in res["scenarios"]]
    factorial = {
        "exact_best": sum(f["exact_best"] for f in ff),
        "optimal_utility": sum(f["optimal_utility"] for f in ff),
        "runs_mean": statistics.fmean(f["runs"] for f in ff),
        "runs_max": max(f["runs"] for f in ff),
    }
    res.update(engine=engine, coverage=coverage, optuna=optuna, factorial=factorial)
    res["goals"] = _goals(res)
    return res


def _goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per goal: what was measured and whether it is met (None: nothing to judge)."""
    budgets = [str(b) for b in res["config"]["budgets"]]
    n = len(res["scenarios"])
    goals = []
    for b in budgets:
        cell = res["coverage"][b]["by_level"].get("0.95")
        rate = _rate(cell["covered"], cell["total"]) if cell else None
        lo, hi = GOAL_COVERAGE
        goals.append(
            {
                "goal": f"coverage of nominal 95% intervals in {lo:.0%}-{hi:.0%} at budget {b}",
                "value": rate,
                "count": cell["total"] if cell else 0,
                "met": None if rate is None else lo <= rate <= hi,
            }
        )
    for b in budgets:
        rate = res["engine"][b]["false_accept_rate"]
        goals.append(
            {
                "goal": f"null/vanishing accepted <= {GOAL_FALSE_ACCEPT:.0%} at budget {b}",
                "value": rate,
                "count": res["engine"][b]["null_vanishing_total"],
                "met": None if rate is None else rate <= GOAL_FALSE_ACCEPT,
            }
        )
    first = budgets[0]
    exact = {b: res["engine"][b]["exact_best"] / n for b in budgets}
    goals.append(
        {
            "goal": f"exact best >= {GOAL_EXACT:.0%} at <= {first} runs",
            "value": exact[first],
            "count": n,
            "met": exact[first] >= GOAL_EXACT and res["engine"][first]["runs_max"] <= int(first),
        }
    )
    if len(budgets) > 1:
        later = budgets[1:]
        goals.append(
            {
                "goal": f"exact best not lower at {', '.join(later)} than at {first}",
                "value": [exact[b] for b in budgets],
                "count": n,
                "met": all(exact[b] >= exact[first] for b in later),
            }
        )
    return goals


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.0%})" if n else "-"


def calibration_report(res: dict[str, Any]) -> str:
    """The markdown tables (also stored in the JSON as `report`)."""
    cfg, n = res["config"], len(res["scenarios"])
    budgets = [str(b) for b in cfg["budgets"]]
    base = int(budgets[0])
    out = [
        f"\n{n} random scenarios (seeds {cfg['first_scenario']}..), engine at budgets "
        f"{', '.join(budgets)} ({', '.join(f'{int(b) / base:g}x' for b in budgets)}), "
        f"3 seeds + 3 confirmation seeds, margin {cfg['margin'] or 'engine default'}, "
        f"Optuna {cfg['optuna'] or 'not installed'}\n",
        "| engine budget | decisions | exact best | optimal utility | null/vanishing accepted "
        "| power (best set) | power (real gains) | undecided | runs mean, max | s mean |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in budgets:
        e = res["engine"][b]
        out.append(
            f"| {b} | {e['decisions']} | {_pct(e['exact_best'], n)} | "
            f"{_pct(e['optimal_utility'], n)} | "
            f"{_pct(e['null_or_vanishing_accepted'], e['null_vanishing_total'])} | "
            f"{_pct(e['best_accepted'], e['best_size'])} | "
            f"{_pct(e['real_accepted'], e['real_total'])} | {e['undecided']} | "
            f"{e['runs_mean']:.0f}, {e['runs_max']} | {e['seconds_mean']:.1f} |"
        )
    out += ["", "Accepted by role (engine):", ""]
    out.append("| budget | " + " | ".join(ROLES) + " |")
    out.append("|---" * (len(ROLES) + 1) + "|")
    for b in budgets:
        e = res["engine"][b]
        cells = [f"{e['accepted_by_role'][r]}/{e['role_totals'][r]}" for r in ROLES]
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    out += ["", "Optuna (exact best, optimal utility; mean runs spent) and the full factorial:", ""]
    out.append("| method | " + " | ".join(f"{b} runs" for b in budgets) + " |")
    out.append("|---" * (len(budgets) + 1) + "|")
    for name, row in res["optuna"].items():
        cells = [
            f"{_pct(c['exact_best'], n)}, {_pct(c['optimal_utility'], n)}; {c['runs_mean']:.0f}"
            for c in row.values()
        ]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    ff = res["factorial"]
    out.append(
        f"| full factorial (its own cost: {ff['runs_mean']:.0f} runs mean, {ff['runs_max']} max) | "
        + " | ".join(
            [f"{_pct(ff['exact_best'], n)}, {_pct(ff['optimal_utility'], n)}"] * len(budgets)
        )
        + " |"
    )
    for title, key in (("level", "by_level"), ("comparison", "by_comparison")):
        groups = sorted({g for b in budgets for g in res["coverage"][b][key]})
        out += ["", f"Interval coverage by {title} (covered/checked):", ""]
        if not groups:
            out.append("(no evidence intervals in the decisions: an engine without `evidence`)")
            continue
        out.append(f"| {title} | " + " | ".join(f"budget {b}" for b in budgets) + " |")
        out.append("|---" * (len(budgets) + 1) + "|")
        for g in groups:
            cells = []
            for b in budgets:
                c = res["coverage"][b][key].get(g)
                cells.append(_pct(c["covered"], c["total"]) if c else "-")
            out.append(f"| {g} | " + " | ".join(cells) + " |")
    out += ["", "Goals:", ""]
    for g in res["goals"]:
        verdict = {None: "n/a", True: "met", False: "NOT met"}[g["met"]]
        value = g["value"]
        if isinstance(value, list):
            shown = ", ".join(f"{v:.0%}" for v in value)
        else:
            shown = "no data" if value is None else f"{value:.1%}"
        out.append(f"- {g['goal']}: {shown} (n={g['count']}): {verdict}")
    out.append(f"\nTime: {res['seconds']:.0f} s.")
    return "\n".join(out)


def calibration_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in `stacklab bench`'s table format: one per goal."""
    rows = []
    for g in res["goals"]:
        value = g["value"][-1] if isinstance(g["value"], list) else g["value"]
        rows.append(
            {
                "benchmark": "engine_search_calibration",
                "case": f"{len(res['scenarios'])} random scenarios",
                "unit": "share",
                "ours": value,
                "peer": None,
                "peer_name": "",
                "ratio": None,
                "goal": g["goal"],
                "met": g["met"],
                "note": f"n={g['count']}",
            }
        )
    return rows


def calibration_main(args: argparse.Namespace) -> None:
    args.scenarios = 20 if args.scenarios is None else args.scenarios
    args.first_scenario = 1000 if args.first_scenario is None else args.first_scenario
    args.samplers = "tpe,nsga2" if args.samplers is None else args.samplers
    if args.quick:
        args.scenarios, args.budgets = 2, "160"
    if _optuna_version() is None:
        print("optuna is not installed (pip install 'optuna>=5'): calibrating without it")
        args.samplers = ""
    res = summarize(calibrate(args))
    res["report"] = calibration_report(res)
    print(res["report"])
    if args.json:
        res["table"] = calibration_rows(res)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
