"""Selection: candidate enumeration, the Pareto front, guardrails and the choice."""

import itertools

import numpy as np
import pytest

from stacklab.errors import StacklabError
from stacklab.integrate.effects import fit_effects
from stacklab.integrate.select import (
    Guardrail,
    Objective,
    candidate_subsets,
    choose,
    objective_scale,
    pareto_front,
    utility_fn,
)


def fit_for(beta, n_seeds=6, noise=0.01, base=1.0, rng_seed=0):
    """A fit of additive effects `beta` from a full factorial, 6 seeds, small noise."""
    n = len(beta)
    rng = np.random.default_rng(rng_seed)
    subsets = [frozenset(c) for r in range(n + 1) for c in itertools.combinations(range(n), r)]
    runs = [
        (s, seed, base + 0.5 * seed + sum(beta[i] for i in s) + noise * rng.normal())
        for seed in range(n_seeds)
        for s in subsets
    ]
    return fit_effects(runs, n, None, draws=400, rng_seed=1)


def test_candidates_respect_choice_groups():
    got = candidate_subsets(4, [[0, 1]])
    assert got[0] == frozenset()
    expected = [
        s
        for s in map(
            frozenset,
            itertools.chain.from_iterable(itertools.combinations(range(4), r) for r in range(5)),
        )
        if not {0, 1} <= s
    ]
    assert len(got) == 12 and set(got) == set(expected)
    assert got == sorted(got, key=lambda s: (len(s), sorted(s)))
    # Overlapping groups: 1 conflicts with 0 and with 2, but 0 and 2 may ship together.
    assert candidate_subsets(3, [[0, 1], [1, 2]]) == [
        frozenset(),
        frozenset({0}),
        frozenset({1}),
        frozenset({2}),
        frozenset({0, 2}),
    ]
    assert candidate_subsets(3, [], max_size=1) == [
        frozenset(),
        *(frozenset({i}) for i in range(3)),
    ]
    assert candidate_subsets(0) == [frozenset()]
    # 20 contributions in four groups of five: 6^4 subsets, well under the cap.
    assert len(candidate_subsets(20, [list(range(g, g + 5)) for g in range(0, 20, 5)])) == 6**4


def test_candidate_cap_and_bad_groups():
    with pytest.raises(StacklabError, match="more than 65536 candidate subsets"):
        candidate_subsets(17)
    with pytest.raises(ValueError, match="names contribution 5"):
        candidate_subsets(3, [[0, 5]])


def test_pareto_front_by_hand():
    points = {"a": (1, 1), "b": (2, 0), "c": (0, 2), "d": (0.5, 0.5), "e": (1, 1), "f": (2, -1)}
    # d is beaten by a; f by b; a and e tie, so both stay.
    assert pareto_front(points, ["max", "max"]) == ["a", "b", "c", "e"]
    # Minimising the second coordinate: f (2, -1) is best on both, so it beats all the others.
    assert pareto_front(points, ["max", "min"]) == ["f"]
    assert pareto_front({"x": (1, 2, 3)}, ["max", "min", "max"]) == ["x"]
    assert pareto_front({}, ["max"]) == []


def test_guardrail_holds_by_hand():
    base = np.array([100.0, 100.0, 100.0])
    delta = np.array([-0.005, -0.01, -0.02])
    assert Guardrail("acc", "min_delta", -0.01).holds(delta, base).tolist() == [True, True, False]
    lat = Guardrail("latency", "min_delta", -0.01, direction="min")
    assert lat.holds(-delta, base).tolist() == [True, True, False]  # may rise by 0.01 at most
    keep90 = Guardrail("tok_s", "ratio", 0.9)
    assert keep90.holds(np.array([-5.0, -10.0, -15.0]), base).tolist() == [True, True, False]
    at_most_110 = Guardrail("mem", "ratio", 1.1, direction="min")
    assert at_most_110.holds(np.array([5.0, 10.0, 15.0]), base).tolist() == [True, True, False]
    with pytest.raises(StacklabError, match="kind"):
        Guardrail("x", "max_delta", 0.0)  # type: ignore[arg-type]


def test_choice_respects_guardrail():
    # accuracy: 0 helps most, 1 helps, 2 hurts. Speed: 0 costs 0.2, which the guardrail forbids.
    fits = {"acc": fit_for([0.3, 0.1, -0.05]), "speed": fit_for([-0.2, 0.0, 0.0], rng_seed=1)}
    objectives = [Objective("acc", "max", 1.0, scale=0.1)]
    candidates = candidate_subsets(3)
    free = choose(fits, objectives, [], candidates)
    assert free.chosen == frozenset({0, 1})
    guard = [Guardrail("speed", "min_delta", -0.05)]
    choice = choose(fits, objectives, guard, candidates)
    assert choice.chosen == frozenset({1})
    rows = {c.subset: c for c in choice.candidates}
    assert rows[frozenset({0, 1})].expected_utility > rows[frozenset({1})].expected_utility
    assert rows[frozenset({0, 1})].guardrail_prob == 0.0 and not rows[frozenset({0, 1})].feasible
    assert rows[frozenset({1})].guardrail_prob >= 0.95 and rows[frozenset({1})].feasible
    assert rows[frozenset({1})].expected_utility == pytest.approx(1.0, abs=0.1)  # 0.1 / 0.1
    assert rows[frozenset({1})].deltas["acc"] == pytest.approx(0.1, abs=0.01)
    assert rows[frozenset({1})].deltas["speed"] == pytest.approx(0.0, abs=0.01)
    assert rows[frozenset({1})].prob_better == 1.0
    assert choice.scales == {"acc": 0.1}
    # Single objective: the front is the best subset.
    assert choice.pareto == [frozenset({0, 1})] and rows[frozenset({0, 1})].pareto


def test_baseline_is_the_fallback_when_nothing_is_safe():
    fits = {"acc": fit_for([0.3, 0.2]), "speed": fit_for([-0.2, -0.3], rng_seed=1)}
    choice = choose(
        fits,
        [Objective("acc")],
        [Guardrail("speed", "min_delta", -0.05)],
        [{0}, {1}, {0, 1}],  # the baseline is added when missing
    )
    assert choice.chosen == frozenset()
    assert choice.candidates[0].subset == frozenset() and choice.candidates[0].feasible


def test_two_objectives_pareto_and_weights():
    # acc (max) and bpb (min): 0 trades bpb for acc, 1 improves both a little.
    fits = {"acc": fit_for([0.3, 0.05]), "bpb": fit_for([0.2, -0.05], rng_seed=2)}
    candidates = candidate_subsets(2)
    acc_first = [Objective("acc", "max", 1.0, scale=0.1), Objective("bpb", "min", 0.1, scale=0.1)]
    choice = choose(fits, acc_first, [], candidates)
    # {0, 1} (+0.35 acc, +0.15 bpb) beats {0} (+0.3, +0.2); {1} beats the baseline.
    assert choice.pareto == [frozenset({1}), frozenset({0, 1})]
    assert choice.chosen == frozenset({0, 1})
    bpb_first = [Objective("acc", "max", 0.1, scale=0.1), Objective("bpb", "min", 1.0, scale=0.1)]
    assert choose(fits, bpb_first, [], candidates).chosen == frozenset({1})
    # utility_fn agrees with the table.
    u = utility_fn(fits, acc_first)
    rows = {c.subset: c for c in choice.candidates}
    mean, draws = u({0, 1})
    assert mean == pytest.approx(rows[frozenset({0, 1})].expected_utility, abs=1e-12)
    assert draws.shape == (400,)


def test_unestimable_candidates_are_not_chosen():
    runs = [(frozenset(s), seed, seed + 0.5 * len(s)) for seed in range(3) for s in [(), (0, 1)]]
    fit = fit_effects(runs, 2, None, draws=50)
    choice = choose({"acc": fit}, [Objective("acc")], [], candidate_subsets(2))
    rows = {c.subset: c for c in choice.candidates}
    assert not rows[frozenset({0})].estimable and not rows[frozenset({0})].feasible
    assert choice.chosen == frozenset({0, 1})


def test_scales_and_config_errors():
    noisy = fit_for([0.3], noise=0.05)
    assert objective_scale(noisy, Objective("acc")) == pytest.approx(noisy.noise_sd)
    assert objective_scale(noisy, Objective("acc", scale=2.0)) == 2.0
    assert objective_scale(fit_for([0.3], noise=0.0), Objective("acc")) == 1.0
    with pytest.raises(StacklabError, match="direction"):
        Objective("acc", "up")  # type: ignore[arg-type]
    with pytest.raises(StacklabError, match="weight"):
        Objective("acc", weight=-1.0)
    with pytest.raises(StacklabError, match="no effects fit for metric 'speed'"):
        choose({"acc": noisy}, [Objective("acc")], [Guardrail("speed", "ratio", 0.9)], [()])
