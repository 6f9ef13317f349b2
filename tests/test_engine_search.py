"""The Optuna baseline of benchmarks/engine_search.py: allowed subsets only, runs counted the
engine's way, guardrails as constraints, and the practitioner's final pick."""

from __future__ import annotations

import math

import pytest

from integrate_sim.benchmark import (
    OptunaTrial,
    World,
    every_subset,
    guardrail_slack,
    optuna_pick,
    optuna_search,
    search_space,
    true_best,
)
from integrate_sim.scenarios import kitchen_sink, write_round
from stacklab.integrate.round import load_round
from stacklab.integrate.select import candidate_subsets


@pytest.fixture
def kitchen(tmp_path):
    scenario = kitchen_sink(2, 0.05)  # gains many standard errors apart, a null, a vanisher
    rnd = load_round(write_round(tmp_path, scenario, budget=200))
    return scenario, rnd


def test_search_space_is_the_allowed_subsets(kitchen):
    _, rnd = kitchen
    space = search_space(len(rnd.ids), rnd.groups)
    allowed = set(candidate_subsets(len(rnd.ids), rnd.groups))
    assert len(space) == 7  # six free contributions and one choice group (dapo | gspo | none)
    assert math.prod(len(choices) for _, choices in space) == len(allowed) == 192
    group = [choices for _, choices in space if len(choices) == 3]
    assert group == [[frozenset(), *(frozenset({i}) for i in sorted(rnd.groups[0]))]]


def test_overlapping_groups_form_one_parameter():
    space = search_space(4, [[0, 1], [1, 2]])
    assert [name for name, _ in space] == ["c0_1_2", "c3"]
    assert set(space[0][1]) == set(candidate_subsets(3, [[0, 1], [1, 2]]))


def test_optuna_search_counts_runs_like_the_engine(kitchen):
    pytest.importorskip("optuna", minversion="5.0", reason="optuna >= 5 is not installed")
    scenario, rnd = kitchen
    world = World(rnd, scenario)
    history = optuna_search(rnd, world, "nsga2", max_runs=60, seed=2)
    assert history[0] == OptunaTrial(frozenset(), 3)  # the baseline first, on the 3 seeds
    runs = [t.runs for t in history]
    assert runs == sorted(runs) and runs[-1] == len(world.runs) and 60 <= runs[-1] <= 62
    assert runs[-1] == 3 * len({t.subset for t in history})  # a repeated subset costs nothing
    allowed = set(candidate_subsets(len(rnd.ids), rnd.groups))
    assert all(t.subset in allowed for t in history)


def test_guardrails_are_constraints(kitchen):
    scenario, rnd = kitchen
    world = World(rnd, scenario)
    bigbatch = frozenset({rnd.ids.index("bigbatch")})
    assert guardrail_slack(rnd, world, bigbatch)[0] > 0  # keeps 80% of speed, needs 90%
    assert guardrail_slack(rnd, world, frozenset())[0] < 0


def test_practitioner_pick(kitchen):
    # Only properties that hold whatever the noise draws are: the stand-in trainer keys its
    # noise on the whole recipe's hash, so a new recipe field reshuffles every draw.
    scenario, rnd = kitchen
    world = World(rnd, scenario)
    allowed = candidate_subsets(len(rnd.ids), rnd.groups)
    history = every_subset(rnd, world)
    assert [t.subset for t in history] == allowed
    assert [t.runs for t in history] == [3 * (k + 1) for k in range(len(allowed))]
    feasible = [s for s in allowed if guardrail_slack(rnd, world, s)[0] <= 0]
    assert len(feasible) == len(allowed) // 2  # every subset with bigbatch breaks the guardrail

    def quality(subset):
        return world.mean(subset, "quality")

    # "best": one objective, so the highest utility is the highest mean quality.
    top, spent = optuna_pick(rnd, world, history, 10_000, "best")
    assert spent == 3 * len(allowed)
    assert top == max(feasible, key=quality)
    # "1-SE": the smallest feasible subset within one standard error of it, so never larger,
    # and no smaller feasible subset comes that close. The true best is three contributions
    # with gains many standard errors wide: the rule lands on them or on a tie with a null.
    lean, _ = optuna_pick(rnd, world, history, 10_000, "1se")
    assert lean in feasible and len(lean) <= len(top) and quality(lean) <= quality(top)
    assert true_best(rnd, scenario) <= lean
    smaller = [s for s in feasible if len(s) < len(lean)]
    assert max(map(quality, smaller)) < quality(lean)
    # A budget sees only the trials done within it; below the baseline's runs, nothing.
    assert optuna_pick(rnd, world, history, 3, "best") == (frozenset(), 3)
    assert optuna_pick(rnd, world, history, 2, "best") == (frozenset(), 0)
