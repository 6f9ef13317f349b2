"""The engine against exhaustive search, one-at-a-time greedy and Optuna, on the same scenarios.

    OMP_NUM_THREADS=1 .venv/bin/python tests/integrate_sim/benchmark.py --scenarios 10

Each scenario is `kitchen_sink(seed, noise)`: eight contributions with a conflict, a gain
that vanishes in combination, a guardrail violation, a null and a choice group. The engine
runs through the external runner; the baselines compute the same synthetic metrics
in-process (same noise: a run is a pure function of recipe and seed), and every method's
runs are counted the engine's way: one distinct recipe x seed is one run, whoever asks twice.
This script prints the engine / factorial / greedy table; benchmarks/engine_search.py adds
Optuna and the budget sweep.

* full factorial: every allowed subset on the round's seeds, effects fit, `select.choose`.
* greedy: from the baseline, try each contribution in turn (swapping within a choice
  group), keep it if it beats the current recipe on 3 fresh paired seeds (one-sided t-test
  at 95%) while speed keeps 90% of the baseline's.
* optuna (`optuna_search`, `optuna_pick`): a black-box multi-objective sampler. One
  categorical parameter per contribution, or per choice group (its members or none); each
  trial runs its subset on the round's seeds (paired: every trial sees the same seeds, so
  the seed-to-seed shift cancels in comparisons); the objectives are the round's, the
  guardrails are Optuna constraints. The practitioner's pick at a budget: among the
  feasible trials on the Pareto front, the highest utility as the engine defines it
  (weight x sign x change from the baseline / one run's noise sd), or with the "one
  standard error" parsimony rule, the smallest subset within one standard error of it.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console

from integrate_sim.objective import simulate
from integrate_sim.scenarios import Scenario, ground_truth, kitchen_sink, write_round
from stacklab.integrate.contributions import apply_subset
from stacklab.integrate.effects import fit_effects
from stacklab.integrate.engine import integrate
from stacklab.integrate.round import Round, load_round
from stacklab.integrate.select import candidate_subsets, choose, pareto_front
from stacklab.integrate.utility import utility as engine_utility

T_95_DF2 = 2.92  # one-sided 95% quantile of Student's t with 2 degrees of freedom
Subset = frozenset[int]
PickRule = Literal["best", "1se"]
SAMPLERS = ("nsga2", "tpe")


class World:
    """Synthetic runs of one scenario, counted once per distinct recipe and seed."""

    def __init__(self, rnd: Round, scenario: Scenario):
        self.rnd, self.truth = rnd, ground_truth(scenario)
        self.runs: dict[tuple[frozenset[int], int], dict[str, float]] = {}

    def metrics(self, subset: frozenset[int], seed: int) -> dict[str, float]:
        if (subset, seed) not in self.runs:
            ids = {self.rnd.ids[i] for i in subset}
            recipe = apply_subset(self.rnd.baseline, self.rnd.contributions, ids).to_dict()
            self.runs[subset, seed] = simulate({**recipe, "seed": seed}, seed, self.truth)
        return self.runs[subset, seed]

    def mean(self, subset: Subset, metric: str) -> float:
        """The subset's mean over the round's seeds (runs it where missing)."""
        return statistics.fmean(self.metrics(subset, s)[metric] for s in self.rnd.seeds)


@dataclass(frozen=True)
class EngineResult:
    selected: Subset
    runs: int
    reasons_right: bool


def run_engine(scenario: Scenario, root: Path, budget: int) -> tuple[Round, EngineResult]:
    """One engine round on `scenario` (external runner, in `root`): what it chose, at what cost."""
    round_file = write_round(root, scenario, budget=budget)
    rnd = load_round(round_file)
    d = integrate(round_file, root / "out", Console(file=io.StringIO())).decision
    kinds = {x.id: x.kind for x in d.decisions if x.status == "shelved"}
    selected = frozenset(rnd.ids.index(c) for c in d.selected)
    return rnd, EngineResult(selected, d.runs.total, kinds == scenario.kinds)


def true_best(rnd: Round, scenario: Scenario) -> Subset:
    return frozenset(rnd.ids.index(c) for c in scenario.best)


def full_factorial(rnd: Round, world: World) -> frozenset[int]:
    subsets = candidate_subsets(len(rnd.ids), rnd.groups)
    fits = {}
    for metric in rnd.metrics:
        obs = [(s, seed, world.metrics(s, seed)[metric]) for seed in rnd.seeds for s in subsets]
        fits[metric] = fit_effects(obs, len(rnd.ids), "all", draws=1000)
    return choose(fits, rnd.objectives, rnd.guardrails, subsets).chosen


def greedy(rnd: Round, world: World) -> frozenset[int]:
    current: frozenset[int] = frozenset()
    next_seed = 0
    for i in range(len(rnd.ids)):
        rivals = {j for g in rnd.groups if i in g for j in g} - {i}
        candidate = (current - rivals) | {i}
        seeds = list(range(next_seed, next_seed + 3))
        next_seed += 3
        gain = [
            world.metrics(candidate, s)["quality"] - world.metrics(current, s)["quality"]
            for s in seeds
        ]
        speed = statistics.mean(world.metrics(candidate, s)["speed"] for s in seeds)
        base = statistics.mean(world.metrics(frozenset(), s)["speed"] for s in seeds)
        sd = statistics.stdev(gain) or 1e-12
        t = statistics.mean(gain) / (sd / len(gain) ** 0.5)
        if t > T_95_DF2 and speed >= 0.9 * base:
            current = candidate
    return current


# ---------------------------------------------------------------------- the Optuna baseline


def search_space(n: int, groups: Sequence[Sequence[int]]) -> list[tuple[str, list[Subset]]]:
    """One categorical parameter per block: a free contribution (off / on) or a set of
    overlapping choice groups (every allowed pick of its members, none included), so every
    point of the space is an allowed subset and nothing is wasted on impossible recipes."""
    blocks: list[set[int]] = []
    for g in groups:
        block = set(g)
        for other in [b for b in blocks if b & block]:
            blocks.remove(other)
            block |= other
        blocks.append(block)
    grouped = {i for b in blocks for i in b}
    blocks += [{i} for i in range(n) if i not in grouped]
    space = []
    for block in sorted(blocks, key=min):
        members = sorted(block)
        local = [[members.index(i) for i in g if i in block] for g in groups]
        picks = candidate_subsets(len(members), [g for g in local if g])
        choices = [frozenset(members[i] for i in p) for p in picks]
        space.append(("c" + "_".join(map(str, members)), choices))
    return space


def _label(subset: Subset) -> str:
    return "+".join(map(str, sorted(subset))) or "none"


@dataclass(frozen=True)
class OptunaTrial:
    """One finished trial: its subset and the distinct runs spent once it was done."""

    subset: Subset
    runs: int


def guardrail_slack(rnd: Round, world: World, subset: Subset) -> list[float]:
    """Optuna constraint values (<= 0 is feasible), one per guardrail, on seed-paired means."""
    out = []
    for g in rnd.guardrails:
        base = world.mean(frozenset(), g.metric)
        delta = world.mean(subset, g.metric) - base
        sign = 1.0 if g.direction == "max" else -1.0
        if g.kind == "min_delta":
            out.append(g.threshold - sign * delta)
        else:
            out.append(-sign * (base + delta - g.threshold * base))
    return out


def make_sampler(name: str, seed: int) -> Any:
    """The sampler at its best setting we found for budgets of a few dozen trials.

    NSGA-II: population 10 (the default 50 would not finish one generation at the engine's
    budget, and did worse in a sweep of 10 / 50); TPE: its defaults (multivariate did no
    better). Constraints reach both through `Trial.set_constraint` (Optuna >= 5).
    """
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=10, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)}, random)")


def optuna_search(
    rnd: Round,
    world: World,
    sampler: str,
    max_runs: int,
    seed: int = 0,
    max_repeats: int = 300,
) -> list[OptunaTrial]:
    """Ask/tell until `max_runs` distinct runs are spent (or every subset is measured).

    The baseline is the first trial (a practitioner measures what they compare against).
    A repeated subset costs no run (its runs are in the store, as for the engine) and tells
    the sampler the same values; `max_repeats` repeats in a row end the search.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space(len(rnd.ids), rnd.groups)
    labels = [{_label(c): c for c in choices} for _, choices in space]
    n_allowed = math.prod(len(c) for _, c in space)
    directions = ["maximize" if o.direction == "max" else "minimize" for o in rnd.objectives]
    study = optuna.create_study(directions=directions, sampler=make_sampler(sampler, seed))
    study.enqueue_trial({name: "none" for name, _ in space})
    history: list[OptunaTrial] = []
    seen: set[Subset] = set()
    repeats = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while len(world.runs) < max_runs and len(seen) < n_allowed and repeats < max_repeats:
            trial = study.ask()
            subset: Subset = frozenset()
            for (name, _), by_label in zip(space, labels, strict=True):
                subset |= by_label[trial.suggest_categorical(name, list(by_label))]
            repeats = repeats + 1 if subset in seen else 0
            seen.add(subset)
            values = [world.mean(subset, o.name) for o in rnd.objectives]
            slack = guardrail_slack(rnd, world, subset)
            for k, (g, value) in enumerate(zip(rnd.guardrails, slack, strict=True)):
                trial.set_constraint(f"{k}_{g.metric}_{g.kind}", value)
            study.tell(trial, values)
            history.append(OptunaTrial(subset, len(world.runs)))
    return history


def every_subset(rnd: Round, world: World) -> list[OptunaTrial]:
    """A search that measured every allowed subset on the round's seeds: the ceiling of any
    sampler whose trials run on those seeds, whatever its budget."""
    history = []
    for subset in candidate_subsets(len(rnd.ids), rnd.groups):
        world.mean(subset, rnd.metrics[0])
        history.append(OptunaTrial(subset, len(world.runs)))
    return history


def optuna_pick(
    rnd: Round, world: World, history: Sequence[OptunaTrial], budget: int, rule: PickRule
) -> tuple[Subset, int]:
    """The final subset a practitioner takes from the trials done within `budget` runs, and
    the runs those trials spent.

    "best": among the feasible trials on the Pareto front of the round's objectives, the
    highest utility. Utility and feasibility are the engine's (`utility.utility`,
    `select.choose`): sum of weight x sign x change from the baseline / scale, scale = the
    objective's own or one run's noise sd after the seed effect; the baseline is always
    feasible. Here on the measured means, as a practitioner reads them, not on a fitted model.
    "1se": the smallest feasible subset whose utility is at most one standard error (of the
    difference of two measured subsets) below the best one's: the usual guard against
    keeping a contribution whose gain is noise.
    """
    done = [t for t in history if t.runs <= budget]
    measured = list(dict.fromkeys(t.subset for t in done))
    if frozenset() not in measured:
        return frozenset(), 0
    spent = max(t.runs for t in done)
    base = frozenset()
    means = {s: {m: world.mean(s, m) for m in rnd.metrics} for s in measured}
    feasible = [
        s for s in measured if not s or max(guardrail_slack(rnd, world, s), default=0.0) <= 0.0
    ]
    k = len(rnd.seeds)
    var_diff = 0.0  # variance of a utility difference of two subsets (paired seeds)
    scales = {}
    for o in rnd.objectives:
        sd = _noise_sd(rnd, world, measured, o.name)
        scales[o.name] = o.scale or (sd if sd > 0 else 1.0)
        var_diff += (o.weight * sd / scales[o.name]) ** 2 * 2.0 / k
    utility = {
        s: engine_utility({m: means[s][m] - means[base][m] for m in scales}, rnd.objectives, scales)
        for s in feasible
    }
    front = pareto_front(
        {s: [means[s][o.name] for o in rnd.objectives] for s in feasible},
        [o.direction for o in rnd.objectives],
    )
    best = min(front, key=lambda s: (-utility[s], len(s), sorted(s)))
    if rule == "best":
        return best, spent
    floor = utility[best] - math.sqrt(var_diff)
    near = [s for s in feasible if utility[s] >= floor]
    return min(near, key=lambda s: (len(s), -utility[s], sorted(s))), spent


def _noise_sd(rnd: Round, world: World, subsets: Sequence[Subset], metric: str) -> float:
    """One run's noise after the seed effect: residual sd of subset + seed (two-way, balanced)."""
    y = np.array([[world.metrics(s, seed)[metric] for seed in rnd.seeds] for s in subsets])
    r = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    df = (y.shape[0] - 1) * (y.shape[1] - 1)
    return float(math.sqrt((r**2).sum() / df)) if df > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.15)
    parser.add_argument("--budget", type=int, default=200)
    args = parser.parse_args()
    rows: dict[str, list[tuple[bool, int]]] = {"engine": [], "full factorial": [], "greedy": []}
    reasons_right = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, args.scenarios + 1):
            scenario = kitchen_sink(seed, args.noise)
            rnd, eng = run_engine(scenario, Path(tmp) / f"s{seed}", args.budget)
            best = true_best(rnd, scenario)
            rows["engine"].append((eng.selected == best, eng.runs))
            reasons_right += eng.reasons_right

            world = World(rnd, scenario)
            rows["full factorial"].append((full_factorial(rnd, world) == best, len(world.runs)))
            world = World(rnd, scenario)
            rows["greedy"].append((greedy(rnd, world) == best, len(world.runs)))
            print(f"scenario {seed}: " + ", ".join(f"{k} {v[-1]}" for k, v in rows.items()))

    n = args.scenarios
    print(f"\n{n} kitchen-sink scenarios, noise sd {args.noise}, 3 seeds:\n")
    print("| method | true best subset found | runs per round (mean, max) |")
    print("|---|---|---|")
    for name, results in rows.items():
        found = sum(ok for ok, _ in results)
        runs = [r for _, r in results]
        print(f"| {name} | {found}/{n} | {statistics.mean(runs):.0f}, {max(runs)} |")
    print(f"\nEngine: every shelving reason right in {reasons_right}/{n}.")


if __name__ == "__main__":
    main()
