"""Credit: exact Shapley and Banzhaf on hand games, and credit from a fitted model's draws."""

import itertools

import numpy as np
import pytest

from stacklab.integrate.credit import banzhaf, credit_with_intervals, shapley
from stacklab.integrate.effects import fit_effects
from stacklab.integrate.select import Objective
from stacklab.integrate.utility import UtilityDraws

BETA = [0.3, -0.2, 0.1, 0.05]
GAMMA = {(0, 1): 0.06, (1, 3): 0.04}


def game_value(s):
    return sum(BETA[i] for i in s) + sum(g for (i, j), g in GAMMA.items() if {i, j} <= s)


def fitted(noise=0.0, n_seeds=2, draws=300):
    rng = np.random.default_rng(5)
    subsets = [frozenset(c) for r in range(5) for c in itertools.combinations(range(4), r)]
    runs = [
        (s, seed, 1.0 + seed + game_value(s) + noise * rng.normal())
        for seed in range(n_seeds)
        for s in subsets
    ]
    return fit_effects(runs, 4, "all", draws=draws, rng_seed=2)


def test_shapley_of_additive_game_is_the_weights():
    w = {3: 0.5, 7: -1.25, 9: 2.0}
    v = lambda s: sum(w[i] for i in s)  # noqa: E731
    assert shapley(v, [3, 7, 9]) == pytest.approx(w, abs=1e-12)
    assert banzhaf(v, [3, 7, 9]) == pytest.approx(w, abs=1e-12)


def test_pure_pairwise_game_splits_the_interaction_equally():
    v = lambda s: 6.0 if {0, 1} <= s else 0.0  # noqa: E731
    assert shapley(v, [0, 1, 2]) == pytest.approx({0: 3.0, 1: 3.0, 2: 0.0}, abs=1e-12)
    assert banzhaf(v, [0, 1, 2]) == pytest.approx({0: 3.0, 1: 3.0, 2: 0.0}, abs=1e-12)


def test_shapley_is_efficient_on_a_random_game():
    rng = np.random.default_rng(0)
    players = [0, 1, 2, 3, 4]
    table = {
        frozenset(c): rng.normal() for r in range(6) for c in itertools.combinations(players, r)
    }
    phi = shapley(table.__getitem__, players)
    assert sum(phi.values()) == pytest.approx(
        table[frozenset(players)] - table[frozenset()], abs=1e-12
    )


def test_weighted_voting_game_by_hand():
    # Quota 3, weights (2, 1, 1): winning coalitions {0,1}, {0,2}, {0,1,2}.
    weights = {0: 2, 1: 1, 2: 1}
    v = lambda s: float(sum(weights[i] for i in s) >= 3)  # noqa: E731
    # Shapley: 0 is pivotal in 4 of the 6 orders -> 2/3; 1 and 2 in one each -> 1/6.
    assert shapley(v, [0, 1, 2]) == pytest.approx({0: 2 / 3, 1: 1 / 6, 2: 1 / 6}, abs=1e-12)
    # Banzhaf: 0 swings {1}, {2}, {1,2} (3 of 4 subsets of the others); 1 swings only {0}.
    assert banzhaf(v, [0, 1, 2]) == pytest.approx({0: 0.75, 1: 0.25, 2: 0.25}, abs=1e-12)
    # Majority of three: Shapley 1/3 each, Banzhaf 1/2 each (not efficient).
    maj = lambda s: float(len(s) >= 2)  # noqa: E731
    assert shapley(maj, [0, 1, 2]) == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3}, abs=1e-12)
    assert banzhaf(maj, [0, 1, 2]) == pytest.approx({0: 0.5, 1: 0.5, 2: 0.5}, abs=1e-12)


def test_player_checks():
    with pytest.raises(ValueError, match="repeat"):
        shapley(len, [1, 1])
    with pytest.raises(ValueError, match="k = 17"):
        shapley(len, list(range(17)))
    assert shapley(len, []) == {}


def test_credit_from_a_noiseless_fit_matches_the_closed_form():
    credit = credit_with_intervals(fitted(), final={0, 1, 2}, shelved=[3])
    # Final game over {0,1,2}: beta_i + half of gamma_01; gamma_13 is not in it.
    expected = {0: 0.3 + 0.03, 1: -0.2 + 0.03, 2: 0.1}
    for i, value in expected.items():
        c = credit[i]
        assert c.status == "final"
        assert c.shapley.estimate == pytest.approx(value, abs=1e-9)
        assert c.banzhaf.estimate == pytest.approx(value, abs=1e-9)
        assert c.shapley.low == pytest.approx(value, abs=1e-9)
        assert c.shapley.high == pytest.approx(value, abs=1e-9)
    assert credit[0].marginal.estimate == pytest.approx(0.3 + 0.06, abs=1e-9)  # leave-one-out
    assert credit[2].marginal.estimate == pytest.approx(0.1, abs=1e-9)
    # Shelved 3: Shapley in the game over {0,1,2,3}; marginal = adding it to the final recipe.
    s = credit[3]
    assert s.status == "shelved"
    assert s.shapley.estimate == pytest.approx(0.05 + 0.02, abs=1e-9)
    assert s.marginal.estimate == pytest.approx(0.05 + 0.04, abs=1e-9)
    assert sum(credit[i].shapley.estimate for i in (0, 1, 2)) == pytest.approx(
        game_value(frozenset({0, 1, 2})), abs=1e-9
    )


def test_credit_intervals_come_from_the_joint_draws():
    fit = fitted(noise=0.03, n_seeds=6, draws=400)
    credit = credit_with_intervals(fit, final=[0, 1, 2], shelved=[3])
    # Per draw, Shapley in a pairwise model is beta_i + 1/2 sum of gamma_ij over present j.
    col = {t: k for k, t in enumerate(fit.terms)}
    d = fit.coef_draws
    per_draw = d[:, col[(0,)]] + 0.5 * (d[:, col[(0, 1)]] + d[:, col[(0, 2)]])
    low, high = np.quantile(per_draw, [0.025, 0.975])
    assert credit[0].shapley.low == pytest.approx(low, abs=1e-12)
    assert credit[0].shapley.high == pytest.approx(high, abs=1e-12)
    assert credit[0].shapley.low < 0.33 < credit[0].shapley.high
    # Efficiency of the estimates: credits add up to the predicted gain of the final recipe.
    total = sum(credit[i].shapley.estimate for i in (0, 1, 2))
    assert total == pytest.approx(fit.predict_delta({0, 1, 2})[0], abs=1e-12)
    shelved_marginal = fit.predict_delta({0, 1, 2, 3})[1] - fit.predict_delta({0, 1, 2})[1]
    assert credit[3].marginal.low == pytest.approx(np.quantile(shelved_marginal, 0.025), abs=1e-12)


def test_credit_for_the_utility_through_a_value_function():
    fit = fitted(noise=0.03, n_seeds=6, draws=200)
    u = UtilityDraws({"bpb": fit}, [Objective("bpb", "min", weight=1.0, scale=0.5)])
    by_utility = credit_with_intervals(u, final=[0, 1], shelved=[2])
    by_fit = credit_with_intervals(fit, final=[0, 1], shelved=[2])
    for i in (0, 1, 2):  # utility = -delta / 0.5
        assert by_utility[i].shapley.estimate == pytest.approx(-2 * by_fit[i].shapley.estimate)
        assert by_utility[i].shapley.low == pytest.approx(-2 * by_fit[i].shapley.high)
        assert by_utility[i].marginal.estimate == pytest.approx(-2 * by_fit[i].marginal.estimate)
    with pytest.raises(ValueError, match="both final and shelved"):
        credit_with_intervals(fit, final=[0], shelved=[0])
