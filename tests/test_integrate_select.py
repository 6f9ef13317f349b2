"""Selection: candidate enumeration, the Pareto front, guardrails and the choice."""

import itertools

import numpy as np
import pytest

from stacklab.errors import StacklabError
from stacklab.integrate.effects import fit_effects
from stacklab.integrate.planner import screening_design
from stacklab.integrate.select import (
    SEARCH_TOP,
    Guardrail,
    Objective,
    candidate_subsets,
    choose,
    count_subsets,
    pareto_front,
    search_candidates,
)
from stacklab.integrate.utility import UtilityDraws, objective_scale, utility


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
    too_many = "more than 65536 candidate subsets: too many to enumerate; use search_candidates"
    with pytest.raises(StacklabError, match=too_many):
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
    # The utility of the model's draws agrees with the table, and with the utility of the
    # predicted changes (one formula: weight x sign x change / scale, summed).
    u = UtilityDraws(fits, acc_first)
    rows = {c.subset: c for c in choice.candidates}
    mean, draws = u({0, 1})
    assert mean == pytest.approx(rows[frozenset({0, 1})].expected_utility, abs=1e-12)
    assert draws.shape == (400,)
    deltas = {m: fits[m].predict_delta({0, 1})[0] for m in fits}
    assert utility(deltas, acc_first, choice.scales) == mean
    assert utility({"acc": 0.5, "bpb": 0.2}, acc_first) == pytest.approx(
        1.0 * 0.5 / 0.1 - 0.1 * 0.2 / 0.1
    )


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


# ------------------------------------------------------------------ counting and searching

OVERLAPPING = [
    (0, []),
    (3, []),
    (4, [[0, 1]]),
    (3, [[0, 1], [1, 2]]),  # a chain: 1 conflicts with 0 and 2
    (6, [[0, 1, 2], [2, 3], [3, 4, 5], [5, 0]]),  # a cycle of overlapping groups
    (7, [[0, 1], [0, 2], [0, 3], [4, 5, 6]]),  # a star and a separate group
    (8, [[0, 1, 2, 3], [1, 2, 4], [4, 5], [6, 7], [6, 7]]),  # repeated group
    (10, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [1, 3, 5, 7, 9]]),
]


@pytest.mark.parametrize(("n", "groups"), OVERLAPPING)
def test_count_subsets_matches_enumeration(n, groups):
    assert count_subsets(n, groups) == len(candidate_subsets(n, groups))


def test_count_subsets_random_overlaps_and_large_rounds():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 12))
        groups = [
            sorted(rng.choice(n, size=int(rng.integers(1, min(n, 4) + 1)), replace=False))
            for _ in range(int(rng.integers(0, 5)))
        ]
        assert count_subsets(n, groups) == len(candidate_subsets(n, groups)), (n, groups)
    # Far past what can be enumerated: no groups, disjoint groups, and a long chain.
    assert count_subsets(60, []) == 2**60
    assert count_subsets(30, [[0, 1, 2], [3, 4]]) == 4 * 3 * 2**25
    chain = [[i, i + 1] for i in range(39)]  # no two neighbours: Fibonacci(42)
    fib = [1, 1]
    while len(fib) < 43:
        fib.append(fib[-1] + fib[-2])
    assert count_subsets(40, chain) == fib[41]
    with pytest.raises(ValueError, match="names contribution 5"):
        count_subsets(3, [[0, 5]])


def test_search_small_round_is_every_subset():
    fits = {"acc": fit_for([0.3, 0.1, -0.05, 0.2])}
    groups = [[0, 1]]
    everything = candidate_subsets(4, groups)
    got = search_candidates(fits, [Objective("acc")], [], 4, groups, must_include=[frozenset({2})])
    assert got == everything
    assert search_candidates(fits, [Objective("acc")], [], 4, groups, limit=12) == everything


# A large synthetic round: 30 contributions, 8 real gains, 22 with a small cost each (a known
# effect, so noise cannot make them look useful), a conflict (0 with 5), a synergy (1 with 2),
# a mild clash (3 with 4), and a choice group {6, 7} where 7 is the better member.
# Truth: 0..4 and 7, utility 1.0+0.8+0.7+0.6+0.5+0.6 +0.3-0.2; adding 5 costs 0.5 net.
N_LARGE = 30
GAINS = {0: 1.0, 1: 0.8, 2: 0.7, 3: 0.6, 4: 0.5, 5: 0.5, 6: 0.4, 7: 0.6}
PAIRS = {(0, 5): -1.0, (1, 2): 0.3, (3, 4): -0.2}
GROUPS = [[6, 7]]
BEST = frozenset({0, 1, 2, 3, 4, 7})
SPEED_COST = {2: -20.0}  # 2 costs 20% speed: breaks a "keep 90%" guardrail
BEST_SAFE = frozenset({0, 1, 3, 4, 7})


def large_world(seed=0):
    beta = -np.random.default_rng(seed).uniform(0.05, 0.15, N_LARGE)
    for i, b in GAINS.items():
        beta[i] = b
    return beta


def quality(s, beta):
    return sum(beta[i] for i in s) + sum(g for (a, b), g in PAIRS.items() if a in s and b in s)


def large_fits(also_run=(), seed=0, noise=0.02):
    """Fits (all pairs) of quality and speed on a screening-like design, 3 seeds.

    Baseline, each alone, the all-in variants and their leave-one-outs, 12 random allowed
    subsets and `also_run` (what adaptive batches would have run by the time of a choice).
    """
    beta = large_world(seed)
    rng = np.random.default_rng(seed + 1)
    design = screening_design(N_LARGE, GROUPS)
    while len(design) < len(screening_design(N_LARGE, GROUPS)) + 12:
        s = frozenset(int(i) for i in np.flatnonzero(rng.random(N_LARGE) < 0.5))
        if not {6, 7} <= s:
            design.append(s)
    design = list(dict.fromkeys([*design, *also_run]))
    quality_runs, speed_runs = [], []
    for seed_ in range(3):
        for s in design:
            q = 10.0 + 0.3 * seed_ + quality(s, beta) + noise * rng.normal()
            v = 100.0 + seed_ + sum(SPEED_COST.get(i, 0.0) for i in s) + 0.2 * rng.normal()
            quality_runs.append((s, seed_, q))
            speed_runs.append((s, seed_, v))
    return {
        "quality": fit_effects(quality_runs, N_LARGE, "all", draws=400, rng_seed=0),
        "speed": fit_effects(speed_runs, N_LARGE, "all", draws=400, rng_seed=0),
    }


def respects_groups(subsets, groups):
    return all(len(s & set(g)) <= 1 for s in subsets for g in groups)


def size_bound(limit, n, must):
    # The documented bound: the baseline, every singleton, must_include and the top are kept
    # whatever the limit; the rest fills up to the limit.
    return max(limit, 1 + n + len(must) + SEARCH_TOP)


def test_search_finds_the_best_of_a_large_round():
    fits = large_fits(also_run=[BEST])
    objectives = [Objective("quality")]
    # Every pair but the choice group's, never run together: p = 464 terms.
    assert len(fits["quality"].terms) == N_LARGE + N_LARGE * (N_LARGE - 1) // 2 - 1
    assert count_subsets(N_LARGE, GROUPS) == 3 * 2**28
    got = search_candidates(fits, objectives, [], N_LARGE, GROUPS)
    assert BEST in got
    assert got[0] == frozenset() and all(frozenset({i}) in got for i in range(N_LARGE))
    assert got == sorted(set(got), key=lambda s: (len(s), sorted(s)))  # sorted, no repeats
    assert respects_groups(got, GROUPS)
    assert len(got) <= size_bound(4096, N_LARGE, [])
    choice = choose(fits, objectives, [], got)
    assert choice.chosen == BEST
    # Among the predictions the runs pin down, BEST's is the highest (unestimable neighbours
    # may predict more, on minimum-norm interactions: they are listed for the planner to run).
    rows = {c.subset: c for c in choice.candidates}
    pinned = [c.expected_utility for c in choice.candidates if c.estimable]
    assert rows[BEST].expected_utility == max(pinned)


@pytest.mark.slow
def test_search_finds_the_best_even_before_it_was_run():
    # Nobody ran BEST: its prediction leans on minimum-norm interactions, but it is found.
    for seed in range(3):
        fits = large_fits(seed=seed)
        got = search_candidates(fits, [Objective("quality")], [], N_LARGE, GROUPS)
        assert BEST in got, seed


def test_search_respects_guardrails_and_keeps_neighbours():
    fits = large_fits(also_run=[BEST, BEST_SAFE])
    objectives = [Objective("quality")]
    guard = [Guardrail("speed", "ratio", 0.9)]
    got = search_candidates(fits, objectives, guard, N_LARGE, GROUPS)
    assert BEST_SAFE in got and BEST in got  # BEST breaks the guardrail but stays listed
    assert respects_groups(got, GROUPS)
    choice = choose(fits, objectives, guard, got)
    assert choice.chosen == BEST_SAFE
    rows = {c.subset: c for c in choice.candidates}
    assert not rows[BEST].feasible


def test_search_limit_and_must_include():
    fits = large_fits()
    objectives = [Objective("quality")]
    must = [frozenset({8, 9, 10}), frozenset({6, 11, 12, 13})]
    got = search_candidates(fits, objectives, [], N_LARGE, GROUPS, must_include=must, limit=50)
    assert all(s in got for s in must)
    assert frozenset() in got and all(frozenset({i}) in got for i in range(N_LARGE))
    assert len(got) == 50 and respects_groups(got, GROUPS)
    tiny = search_candidates(fits, objectives, [], N_LARGE, GROUPS, must_include=must, limit=1)
    assert len(tiny) == size_bound(1, N_LARGE, must)
    with pytest.raises(ValueError, match="choice group"):
        search_candidates(fits, objectives, [], N_LARGE, GROUPS, must_include=[{6, 7}])
    with pytest.raises(ValueError, match=r"not in 0\.\.29"):
        search_candidates(fits, objectives, [], N_LARGE, GROUPS, must_include=[{30}])
    with pytest.raises(ValueError, match="limit"):
        search_candidates(fits, objectives, [], N_LARGE, GROUPS, limit=0)


@pytest.mark.parametrize("seed", range(4))
def test_search_matches_exhaustive_choice_on_a_dense_model(seed):
    # 12 contributions, overlapping groups, every pair interacting strongly: a rugged utility.
    # Forced to search (limit 64 of 1536 subsets), it still finds the exhaustive choice.
    n, groups = 12, [[0, 1, 2], [3, 4], [4, 5]]
    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 1.0, n)
    gamma = {(i, j): rng.normal(0.0, 0.7) for i in range(n) for j in range(i + 1, n)}
    everything = candidate_subsets(n, groups)
    runs = [
        (
            s,
            seed_,
            seed_
            + sum(beta[i] for i in s)
            + sum(g for (i, j), g in gamma.items() if i in s and j in s)
            + 0.01 * rng.normal(),
        )
        for seed_ in range(2)
        for s in everything
    ]
    fits = {"acc": fit_effects(runs, n, "all", draws=100)}
    objectives = [Objective("acc")]
    got = search_candidates(fits, objectives, [], n, groups, limit=64)
    assert len(got) == 64 and respects_groups(got, groups)
    assert (
        choose(fits, objectives, [], got).chosen == choose(fits, objectives, [], everything).chosen
    )
