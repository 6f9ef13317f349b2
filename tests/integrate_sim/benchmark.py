"""The engine against exhaustive search and one-at-a-time greedy, on the same scenarios.

    OMP_NUM_THREADS=1 .venv/bin/python tests/integrate_sim/benchmark.py --scenarios 10

Each scenario is `kitchen_sink(seed, noise)`: eight contributions with a conflict, a gain
that vanishes in combination, a guardrail violation, a null and a choice group. The engine
runs through the external runner; the two baselines compute the same synthetic metrics
in-process (same noise: a run is a pure function of recipe and seed). Prints a Markdown
table: how often each method finds the true best subset, and how many runs it spends.

* full factorial: every allowed subset on the round's seeds, effects fit, `select.choose`.
* greedy: from the baseline, try each contribution in turn (swapping within a choice
  group), keep it if it beats the current recipe on 3 fresh paired seeds (one-sided t-test
  at 95%) while speed keeps 90% of the baseline's.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console

from integrate_sim.objective import simulate
from integrate_sim.scenarios import Scenario, ground_truth, kitchen_sink, write_round
from stacklab.integrate.contributions import apply_subset
from stacklab.integrate.effects import fit_effects
from stacklab.integrate.engine import integrate
from stacklab.integrate.round import Round, load_round
from stacklab.integrate.select import candidate_subsets, choose

T_95_DF2 = 2.92  # one-sided 95% quantile of Student's t with 2 degrees of freedom


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
            root = Path(tmp) / f"s{seed}"
            round_file = write_round(root, scenario, budget=args.budget)
            rnd = load_round(round_file)
            best = frozenset(rnd.ids.index(c) for c in scenario.best)

            d = integrate(round_file, root / "out", Console(file=io.StringIO())).decision
            kinds = {x["id"]: x["kind"] for x in d["decisions"] if x["status"] == "shelved"}
            rows["engine"].append((set(d["selected"]) == scenario.best, d["runs"]["total"]))
            reasons_right += kinds == scenario.kinds

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
