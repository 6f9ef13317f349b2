"""The effects model: exact recovery, seed pairing, identifiability, bootstrap and FDR."""

import itertools
import math

import numpy as np
import pytest

from stacklab.integrate.effects import (
    bootstrap_p_value,
    fit_effects,
)

BETA = [0.3, -0.2, 0.1]
GAMMA_01 = 0.05


def truth(subset, beta=BETA, gamma=None):
    gamma = {(0, 1): GAMMA_01} if gamma is None else gamma
    return sum(beta[i] for i in subset) + sum(g for (i, j), g in gamma.items() if {i, j} <= subset)


def factorial_runs(n, offsets, noise=0.0, rng_seed=0, fn=truth):
    """Every subset of n contributions once per seed; seed s adds offsets[s] to every run."""
    rng = np.random.default_rng(rng_seed)
    subsets = [frozenset(c) for r in range(n + 1) for c in itertools.combinations(range(n), r)]
    return [
        (s, seed, 1.0 + off + fn(s) + noise * rng.normal())
        for seed, off in enumerate(offsets)
        for s in subsets
    ]


@pytest.mark.parametrize("offsets", [[0.0, 5.0], [0.0, 5.0, -3.0, 100.0, 7.0, 2.0]])
def test_recovers_known_coefficients_exactly_without_noise(offsets):
    fit = fit_effects(factorial_runs(3, offsets), 3, interactions=[(1, 0)], draws=200)
    assert fit.bootstrap == ("cluster" if len(offsets) >= 5 else "residual")
    assert fit.terms == ((0,), (1,), (2,), (0, 1))
    np.testing.assert_allclose(fit.coef, [*BETA, GAMMA_01], atol=1e-9, rtol=0)
    assert fit.baseline == pytest.approx(1.0 + np.mean(offsets), abs=1e-9)
    assert fit.main_effects[1].estimate == pytest.approx(-0.2, abs=1e-9)
    assert fit.interactions[(0, 1)].estimate == pytest.approx(GAMMA_01, abs=1e-9)
    assert all(e.identified for e in fit.effects)
    assert fit.residual_df == 8 * len(offsets) - len(offsets) - 4
    # No noise: every draw is the estimate, the interval collapses onto it.
    e = fit.main_effects[0]
    assert e.low == pytest.approx(0.3, abs=1e-9) and e.high == pytest.approx(0.3, abs=1e-9)
    assert e.p_value == pytest.approx(2 / 201)
    delta, draws = fit.predict_delta({0, 1, 2})
    assert delta == pytest.approx(0.3 - 0.2 + 0.1 + GAMMA_01, abs=1e-9)
    assert draws.shape == (200,)
    np.testing.assert_allclose(draws, delta, atol=1e-9)
    level, level_draws = fit.predict({0, 1})
    assert level == pytest.approx(1.0 + np.mean(offsets) + 0.1 + GAMMA_01, abs=1e-9)
    assert level_draws.shape == (200,)
    assert fit.predict_delta(set()) == (0.0, pytest.approx(np.zeros(200)))


def test_interactions_none_and_all():
    runs = factorial_runs(3, [0.0, 1.0])
    assert fit_effects(runs, 3, None, draws=10).terms == ((0,), (1,), (2,))
    all_terms = fit_effects(runs, 3, "all", draws=10).terms
    assert all_terms == ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2))


@pytest.mark.parametrize("n_seeds", [3, 6])
def test_large_per_seed_offsets_do_not_widen_intervals(n_seeds):
    small = factorial_runs(3, [0.0] * n_seeds, noise=0.02, rng_seed=1)
    offsets = [1000.0 * (-1) ** s * (s + 1) for s in range(n_seeds)]
    big = [(s, seed, v + offsets[seed]) for s, seed, v in small]
    a = fit_effects(small, 3, [(0, 1)], draws=500, rng_seed=3)
    b = fit_effects(big, 3, [(0, 1)], draws=500, rng_seed=3)
    assert a.bootstrap == b.bootstrap == ("cluster" if n_seeds >= 5 else "residual")
    for ea, eb in zip(a.effects, b.effects, strict=True):
        assert eb.estimate == pytest.approx(ea.estimate, abs=1e-9)
        assert eb.high - eb.low == pytest.approx(ea.high - ea.low, abs=1e-8)
        assert eb.p_value == ea.p_value
    assert a.main_effects[0].high - a.main_effects[0].low < 0.1  # noise-sized, not offset-sized
    assert b.baseline - a.baseline == pytest.approx(np.mean(offsets), abs=1e-8)


def test_pair_never_run_together_is_dropped_and_reported():
    subsets = [set(), {0}, {1}, {2}, {0, 1}, {0, 2}]
    gamma = {(0, 1): 0.05, (0, 2): -0.07}
    runs = [
        (frozenset(s), seed, 2.0 + seed + truth(s, gamma=gamma))
        for seed in range(2)
        for s in subsets
    ]
    fit = fit_effects(runs, 3, "all", draws=50)
    assert fit.dropped_pairs == ((1, 2),)
    assert set(fit.interactions) == {(0, 1), (0, 2)}
    assert fit.interactions[(0, 2)].estimate == pytest.approx(-0.07, abs=1e-9)
    # The dropped pair's interaction is taken as zero.
    assert fit.predict_delta({0, 1, 2})[0] == pytest.approx(0.3 - 0.2 + 0.1 + 0.05 - 0.07, abs=1e-9)


def test_aliased_and_unobserved_terms_are_flagged_not_fatal():
    # 0 and 1 always run together; 3 never runs: their separate effects are not identified.
    subsets = [set(), {0, 1}, {2}, {0, 1, 2}]
    beta = [0.3, -0.2, 0.1, 0.0]
    runs = [
        (frozenset(s), seed, seed + truth(s, beta=beta, gamma={}))
        for seed in range(3)
        for s in subsets
    ]
    fit = fit_effects(runs, 4, None, draws=50)
    assert [e.identified for e in fit.effects] == [False, False, True, False]
    assert math.isnan(fit.main_effects[0].p_value) and math.isnan(fit.main_effects[0].low)
    assert fit.main_effects[2].estimate == pytest.approx(0.1, abs=1e-9)
    assert fit.main_effects[3].estimate == 0.0
    assert fit.estimable({0, 1}) and fit.estimable({0, 1, 2}) and fit.estimable(set())
    assert not fit.estimable({0}) and not fit.estimable({3}) and not fit.estimable({2, 3})
    assert fit.predict_delta({0, 1})[0] == pytest.approx(0.1, abs=1e-9)  # 0.3 - 0.2, pinned


def test_no_residual_degrees_of_freedom_gives_no_tests():
    fit = fit_effects([(frozenset(), 0, 1.0), (frozenset({0}), 0, 1.5)], 1, draws=20)
    assert fit.residual_df == 0 and math.isnan(fit.noise_sd)
    e = fit.main_effects[0]
    assert e.estimate == pytest.approx(0.5) and e.identified
    assert math.isnan(e.p_value) and math.isnan(e.low) and math.isnan(e.high)
    np.testing.assert_allclose(fit.predict_delta({0})[1], 0.5)


def test_noisy_fit_tests_real_and_null_effects():
    # 0: +0.3 (real), 1: 0 (null), 2: +0.1; noise sd 0.05, 8 seeds.
    runs = factorial_runs(
        3,
        np.linspace(-2, 2, 8),
        noise=0.05,
        rng_seed=7,
        fn=lambda s: truth(s, beta=[0.3, 0.0, 0.1], gamma={}),
    )
    fit = fit_effects(runs, 3, None, draws=1000, rng_seed=0)
    assert fit.bootstrap == "cluster"
    real, null = fit.main_effects[0], fit.main_effects[1]
    assert real.low < 0.3 < real.high and real.p_value < 0.01
    assert null.low < 0.0 < null.high and null.p_value > 0.05
    assert fit.noise_sd == pytest.approx(0.05, rel=0.3)
    again = fit_effects(runs, 3, None, draws=1000, rng_seed=0)
    np.testing.assert_array_equal(again.coef_draws, fit.coef_draws)  # deterministic


def test_bad_observations_are_rejected():
    with pytest.raises(ValueError, match="out of range"):
        fit_effects([(frozenset({3}), 0, 1.0)], 3)
    with pytest.raises(ValueError, match="non-finite"):
        fit_effects([(frozenset(), 0, float("nan"))], 3)
    with pytest.raises(ValueError, match="no observations"):
        fit_effects([], 3)
    with pytest.raises(ValueError, match="bad interaction pair"):
        fit_effects([(frozenset(), 0, 1.0)], 3, [(1, 1)])


def test_bootstrap_p_value_by_hand():
    # one draw <= 0 out of 4: p = 2 * (1 + 1) / (4 + 1)
    assert bootstrap_p_value(np.array([1.0, 2.0, 3.0, -1.0])) == pytest.approx(0.8)
    assert bootstrap_p_value(np.zeros(9)) == 1.0
    assert bootstrap_p_value(np.ones(99)) == pytest.approx(0.02)
