"""Verdict statistics: exact values, coverage, error spending under optional stopping, power.

The simulations use the seed counts rounds use (3, 4, 6, 12) and fixed numpy seeds; each
draws its data vectorised and then runs the real functions on every simulated round.
"""

import functools
import itertools
import math

import numpy as np
import pytest
from scipy import stats

from stacklab.integrate.verdicts import (
    Interval,
    SequentialPlan,
    detectable_gain,
    guard_margins,
    paired_interval,
    pooled_noise,
    seeds_for_power,
    seeds_to_settle,
    verdict,
)

SEED_COUNTS = [3, 4, 6, 12]
SIMS = 4000
# 95% coverage over 4000 rounds has a Monte Carlo sd of ~0.0034; 93-97% is ~6 sd wide.
COVER_LOW, COVER_HIGH = 0.93, 0.97


def iv(estimate, low, high):
    return Interval(estimate, low, high, 0.95, 6, 5.0)


# --- paired_interval: exact values ---------------------------------------------------------


def test_paired_interval_own_spread_exact():
    out = paired_interval([1.0, 2.0, 3.0], 0.95)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert out.estimate == pytest.approx(2.0)
    assert out.low == pytest.approx(2.0 - half)
    assert out.high == pytest.approx(2.0 + half)
    assert out.df == 2
    assert out.n == 3
    assert out.level == 0.95
    assert out.as_list() == pytest.approx([2.0, 2.0 - half, 2.0 + half])


def test_paired_interval_pooled_noise_exact():
    out = paired_interval([1.0, 2.0, 3.0], 0.95, noise=(0.5, 10))
    half = stats.t.ppf(0.975, 10) * 0.5 * math.sqrt(2 / 3)
    assert out.estimate == pytest.approx(2.0)
    assert (out.low, out.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert out.df == 10
    assert out.n == 3


def test_paired_interval_terms_scale_the_noise():
    out = paired_interval([1.0, 2.0, 3.0], 0.9, noise=(0.5, 10), terms=4)
    half = stats.t.ppf(0.95, 10) * 0.5 * math.sqrt(4 / 3)
    assert (out.low, out.high) == pytest.approx((2.0 - half, 2.0 + half))
    # The spread of the values themselves plays no part once the noise is given.
    wide = paired_interval([-10.0, 2.0, 14.0], 0.9, noise=(0.5, 10), terms=4)
    assert wide.high - wide.low == pytest.approx(2 * half)


def test_paired_interval_degenerate_inputs():
    one = paired_interval([0.7], 0.95)
    assert one.estimate == pytest.approx(0.7)
    assert one.low == -math.inf and one.high == math.inf
    assert one.n == 1 and one.df == 0
    # One seed with a pooled noise estimate is bounded.
    one_pooled = paired_interval([0.7], 0.95, noise=(1.0, 20))
    assert math.isfinite(one_pooled.low) and math.isfinite(one_pooled.high)
    empty = paired_interval([], 0.95)
    assert empty.n == 0
    assert math.isnan(empty.estimate)
    assert empty.low == -math.inf and empty.high == math.inf
    # No noise estimate (NaN sd or df 0) -> unbounded.
    nan_noise = paired_interval([1.0, 2.0], 0.95, noise=(math.nan, 0.0))
    assert nan_noise.low == -math.inf and nan_noise.high == math.inf


# --- pooled_noise ---------------------------------------------------------------------------


def table_obs(table):
    return [
        (f"r{r}", s, float(table[r, s]))
        for r in range(table.shape[0])
        for s in range(table.shape[1])
    ]


def test_pooled_noise_balanced_matches_two_way_residual():
    y = np.array([[1.0, 2.5, 0.3], [0.2, 1.9, 1.4], [2.2, 0.1, 0.9]])
    resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    df = (3 - 1) * (3 - 1)
    sd, got_df = pooled_noise(table_obs(y))
    assert got_df == df
    assert sd == pytest.approx(math.sqrt((resid**2).sum() / df))


def test_pooled_noise_unbalanced_matches_lstsq():
    # Recipe "c" misses seed 2 and recipe "b" misses seed 0.
    obs = [
        ("a", 0, 1.0),
        ("a", 1, 1.7),
        ("a", 2, 0.4),
        ("a", 3, 2.0),
        ("b", 1, 2.9),
        ("b", 2, 1.1),
        ("b", 3, 2.2),
        ("c", 0, 0.1),
        ("c", 1, 1.3),
        ("c", 3, 0.9),
    ]
    recipes, seeds = ["a", "b", "c"], [0, 1, 2, 3]
    x = np.zeros((len(obs), len(recipes) + len(seeds)))
    for i, (r, s, _) in enumerate(obs):
        x[i, recipes.index(r)] = 1.0
        x[i, len(recipes) + seeds.index(s)] = 1.0
    y = np.array([o[2] for o in obs])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    df = len(obs) - (len(recipes) + len(seeds) - 1)  # one redundancy between the blocks
    sd, got_df = pooled_noise(obs)
    assert got_df == df == 4
    assert sd == pytest.approx(math.sqrt(resid @ resid / df))


def test_pooled_noise_ignores_recipe_and_seed_effects():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(4, 5))
    shifted = y + np.array([0.0, 3.0, -7.0, 40.0])[:, None] + rng.normal(0, 10, size=5)[None, :]
    base = pooled_noise(table_obs(y))
    moved = pooled_noise(table_obs(shifted))
    assert moved[1] == base[1] == 12
    assert moved[0] == pytest.approx(base[0])


def test_pooled_noise_nothing_to_estimate():
    assert pooled_noise([])[1] == 0 and math.isnan(pooled_noise([])[0])
    # Two recipes on one seed: the fit is exact.
    sd, df = pooled_noise([("a", 0, 1.0), ("b", 0, 2.0)])
    assert df == 0 and math.isnan(sd)


# --- SequentialPlan -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("looks", [1, 2, 3, 4, 7])
def test_plan_alphas_sum_to_alpha(alpha, looks):
    plan = SequentialPlan(alpha, looks, 3)
    spent = [plan.alpha_at(k) for k in range(1, looks + 1)]
    assert sum(spent) == pytest.approx(alpha)
    assert all(a > 0 for a in spent)
    if looks > 1:
        assert spent[-1] == pytest.approx(0.75 * alpha)
        assert sum(spent[:-1]) == pytest.approx(0.25 * alpha)
        assert len(set(spent[:-1])) == 1


def test_plan_single_look_spends_everything():
    plan = SequentialPlan(0.05, 1, 6)
    assert plan.alpha_at(1) == 0.05
    assert plan.level_at(1) == pytest.approx(0.95)
    assert plan.max_seeds == 6


def test_plan_looks_and_levels():
    plan = SequentialPlan(0.05, 4, 3)
    assert plan.max_seeds == 12
    assert plan.level_at(1) == pytest.approx(1 - 0.05 / 12)
    assert plan.level_at(4) == pytest.approx(1 - 0.0375)


@pytest.mark.parametrize(
    "args", [(0.0, 2, 3), (1.0, 2, 3), (-0.1, 2, 3), (0.05, 0, 3), (0.05, 2, 0)]
)
def test_plan_bad_args(args):
    with pytest.raises(ValueError):
        SequentialPlan(*args)


def test_plan_bad_look():
    plan = SequentialPlan(0.05, 4, 3)
    for look in [0, 5]:
        with pytest.raises(ValueError):
            plan.alpha_at(look)
        with pytest.raises(ValueError):
            plan.level_at(look)


# --- verdict --------------------------------------------------------------------------------


def test_verdict_outcomes():
    m = 0.5
    assert verdict(iv(0.8, 0.1, 1.5), m, final=False) == "accept"
    assert verdict(iv(0.8, 0.1, 1.5), m, final=True) == "accept"
    assert verdict(iv(-0.8, -1.5, -0.1), m, final=False) == "harm"
    assert verdict(iv(-0.8, -1.5, -0.1), m, final=True) == "harm"
    # Shown below min_effect, early: small if significant, none if not.
    assert verdict(iv(0.2, 0.05, 0.4), m, final=False) == "small"
    assert verdict(iv(0.1, -0.2, 0.4), m, final=False) == "none"
    # Undecided before the last look, decided at it.
    assert verdict(iv(0.3, -0.2, 0.8), m, final=False) == "open"
    assert verdict(iv(0.3, -0.2, 0.8), m, final=True) == "none"
    assert verdict(iv(0.3, 0.1, 0.8), m, final=False) == "open"
    assert verdict(iv(0.3, 0.1, 0.8), m, final=True) == "small"
    # Significant but the estimate is below min_effect: never accepted.
    assert verdict(iv(0.45, 0.05, 0.85), m, final=False) == "open"
    assert verdict(iv(0.45, 0.05, 0.85), m, final=True) == "small"
    # The estimate exactly at min_effect is enough.
    assert verdict(iv(0.5, 0.05, 0.95), m, final=False) == "accept"
    # Unbounded intervals stay open until the last look.
    assert verdict(iv(0.9, -math.inf, math.inf), m, final=False) == "open"
    assert verdict(iv(0.9, -math.inf, math.inf), m, final=True) == "none"


# --- detectable_gain ------------------------------------------------------------------------


def test_detectable_gain_formula_and_monotone():
    gains = [detectable_gain(1.3, 20, n, 0.05) for n in range(1, 25)]
    assert all(a > b for a, b in itertools.pairwise(gains))
    q = stats.t.ppf(0.975, 20) + stats.t.ppf(0.8, 20)
    assert detectable_gain(1.3, 20, 6, 0.05) == pytest.approx(q * 1.3 * math.sqrt(2 / 6))
    q9 = stats.t.ppf(0.995, 5) + stats.t.ppf(0.9, 5)
    assert detectable_gain(2.0, 0, 6, 0.01, power=0.9) == pytest.approx(q9 * 2.0 * math.sqrt(2 / 6))
    qn = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert detectable_gain(1.0, math.inf, 8, 0.05) == pytest.approx(qn * math.sqrt(2 / 8))
    assert math.isnan(detectable_gain(math.nan, 10, 6, 0.05))
    assert math.isnan(detectable_gain(1.0, 10, 0, 0.05))
    # More noise or a stricter alpha needs a larger gain.
    assert detectable_gain(2.0, 20, 6, 0.05) > detectable_gain(1.0, 20, 6, 0.05)
    assert detectable_gain(1.0, 20, 6, 0.01) > detectable_gain(1.0, 20, 6, 0.05)


# --- guard_margins --------------------------------------------------------------------------


def test_guard_margins_hand_values():
    final = {0: 1.0, 1: 2.0, 2: 4.0, 7: 100.0}
    base = {0: 0.5, 1: 1.0, 2: 3.0, 5: -100.0}
    # Seeds 7 and 5 are not shared and must not appear.
    assert guard_margins("min_delta", 0.25, 1.0, final, base) == pytest.approx([0.25, 0.75, 0.75])
    assert guard_margins("min_delta", -0.5, -1.0, final, base) == pytest.approx([0.0, -0.5, -0.5])
    assert guard_margins("ratio", 0.9, 1.0, final, base) == pytest.approx([0.55, 1.1, 1.3])
    assert guard_margins("ratio", 1.1, -1.0, final, base) == pytest.approx([-0.45, -0.9, -0.7])
    assert guard_margins("min_delta", 0.0, 1.0, {3: 1.0}, {4: 1.0}) == []


# --- coverage by simulation -----------------------------------------------------------------


def covers(interval, truth):
    return interval.low <= truth <= interval.high


@pytest.mark.parametrize("n", SEED_COUNTS)
def test_own_spread_interval_covers_heteroscedastic(n):
    rng = np.random.default_rng(100 + n)
    true_diff = 0.3
    shift = rng.normal(0, 2.0, size=(SIMS, n))
    y_a = 1.0 + true_diff + shift + rng.normal(0, 1.0, size=(SIMS, n))
    y_b = 1.0 + shift + rng.normal(0, 0.5, size=(SIMS, n))
    diffs = y_a - y_b
    rate = np.mean([covers(paired_interval(d, 0.95), true_diff) for d in diffs])
    assert COVER_LOW <= rate <= COVER_HIGH, f"n={n}: own-spread coverage {rate:.4f}"


def pooled_coverage(n, sds, rng_seed):
    """Coverage of the pooled interval for recipe 0 - recipe 1, all recipes in the pool."""
    rng = np.random.default_rng(rng_seed)
    sds = np.asarray(sds)
    effects = np.linspace(0.0, 1.0, len(sds))
    shift = rng.normal(0, 2.0, size=(SIMS, 1, n))
    y = effects[None, :, None] + shift + rng.normal(size=(SIMS, len(sds), n)) * sds[None, :, None]
    true_diff = effects[0] - effects[1]
    hits = 0
    for table in y:
        noise = pooled_noise(table_obs(table))
        assert noise[1] == (len(sds) - 1) * (n - 1)
        hits += covers(paired_interval(table[0] - table[1], 0.95, noise=noise), true_diff)
    return hits / SIMS


@pytest.mark.parametrize("n", SEED_COUNTS)
def test_pooled_interval_covers_when_noise_is_equal(n):
    rate = pooled_coverage(n, [1.0] * 5, 200 + n)
    assert COVER_LOW <= rate <= COVER_HIGH, f"n={n}: pooled coverage {rate:.4f}"


@pytest.mark.parametrize("n", SEED_COUNTS)
def test_pooled_interval_undercovers_when_pool_noise_is_unequal(n):
    """Pooling assumes equal noise: a pair twice as noisy as the rest of its pool is covered
    well below the stated 95% (why the engine never pools the baseline with the final recipe)."""
    rate = pooled_coverage(n, [1.0, 1.0, 0.5, 0.5, 0.5], 300 + n)
    assert rate < COVER_LOW, f"n={n}: pooled coverage with unequal noise {rate:.4f}"


# --- optional stopping ----------------------------------------------------------------------


PLAN = SequentialPlan(0.05, looks=4, block=3)
MIN_EFFECT = 0.5


def null_diffs(rng_seed):
    """Per-seed differences of two recipes with no true gain, run noise sd 1 each."""
    rng = np.random.default_rng(rng_seed)
    shift = rng.normal(0, 2.0, size=(SIMS, PLAN.max_seeds))
    y_a = shift + rng.normal(size=(SIMS, PLAN.max_seeds))
    y_b = shift + rng.normal(size=(SIMS, PLAN.max_seeds))
    return y_a - y_b


def run_plan(d, noise, level_at):
    for look in range(1, PLAN.looks + 1):
        out = verdict(
            paired_interval(d[: look * PLAN.block], level_at(look), noise=noise),
            MIN_EFFECT,
            final=look == PLAN.looks,
        )
        if out != "open":
            return out
    raise AssertionError("the last look must decide")


def run_naive(d, noise, level_at):
    """95% at every look, stop (accept) at the first look whose interval is above zero."""
    for look in range(1, PLAN.looks + 1):
        if paired_interval(d[: look * PLAN.block], 0.95, noise=noise).low > 0:
            return "accept"
    return "none"


NOISES = {"pooled_noise_large_df": (1.0, math.inf), "own_spread": None}
RULES = {
    "spent": (run_plan, PLAN.level_at),
    "flat95": (run_plan, lambda look: 0.95),
    "naive": (run_naive, None),
}


@functools.cache
def false_accept_rate(rule, noise_name):
    """Share of simulated nulls accepted; every rule sees the same simulated rounds."""
    run, level_at = RULES[rule]
    noise = NOISES[noise_name]
    diffs = null_diffs(400 + list(NOISES).index(noise_name))
    return float(np.mean([run(d, noise, level_at) == "accept" for d in diffs]))


@pytest.mark.parametrize("noise_name", NOISES)
def test_spent_alpha_bounds_false_acceptance_under_optional_stopping(noise_name):
    # One-sided: accepting a null needs the low end above zero, at most alpha / 2 = 0.025.
    rate = false_accept_rate("spent", noise_name)
    assert rate <= 0.03, f"{noise_name}: spent plan false acceptance {rate:.4f}"


@pytest.mark.parametrize("noise_name", NOISES)
def test_naive_repeated_looks_inflate_false_acceptance(noise_name):
    naive = false_accept_rate("naive", noise_name)
    spent = false_accept_rate("spent", noise_name)
    assert naive > 0.03, f"{noise_name}: naive false acceptance {naive:.4f}"
    assert naive > spent + 0.01, (noise_name, spent, naive)


def test_unspent_levels_in_the_same_loop_inflate_false_acceptance():
    """The plan's loop with 95% at every look (spending removed) accepts nulls too often."""
    flat = false_accept_rate("flat95", "pooled_noise_large_df")
    spent = false_accept_rate("spent", "pooled_noise_large_df")
    assert flat > 0.03, f"flat 95% false acceptance {flat:.4f}"
    assert flat > spent + 0.01, (spent, flat)


# --- power ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SEED_COUNTS)
def test_detectable_gain_has_its_power(n):
    plan = SequentialPlan(0.0375, looks=1, block=n)
    alpha = plan.alpha_at(1)
    gain = detectable_gain(1.0, math.inf, n, alpha)
    rng = np.random.default_rng(500 + n)
    shift = rng.normal(0, 2.0, size=(SIMS, n))
    y_a = gain + shift + rng.normal(size=(SIMS, n))
    y_b = shift + rng.normal(size=(SIMS, n))
    level = plan.level_at(1)
    hits = [paired_interval(d, level, noise=(1.0, math.inf)).low > 0 for d in y_a - y_b]
    rate = np.mean(hits)
    assert 0.75 <= rate <= 0.85, f"n={n}: power {rate:.4f}"


def test_seeds_to_settle_is_the_fewest_blocks_whose_interval_clears_the_nearer_boundary() -> None:
    def half_width(iv: Interval, extra: int) -> float:
        tail = 0.5 + iv.level / 2
        sd = (iv.high - iv.low) / 2 / stats.t.ppf(tail, iv.df) * math.sqrt(iv.n)
        return stats.t.ppf(tail, iv.df + extra) * sd / math.sqrt(iv.n + extra)

    cases = [  # (interval, min_effect, block, the boundary's distance from the estimate)
        (Interval(0.0, -0.5, 0.5, 0.95, 3, 2.0), 0.25, 3, 0.25),  # below: top under 0.25
        (Interval(0.0, -0.5, 0.5, 0.95, 3, 2.0), 0.25, 1, 0.25),
        (Interval(0.2, -0.1, 0.5, 0.95, 4, 3.0), 0.1, 1, 0.2),  # above: bottom over 0
        (Interval(-0.1, -0.9, 0.7, 0.99, 6, 40.0), 0.3, 3, 0.4),  # pooled df, level 99%
    ]
    for iv, min_effect, block, distance in cases:
        extra = seeds_to_settle(iv, min_effect, block)
        assert extra is not None and extra % block == 0 and extra >= block
        assert half_width(iv, extra) < distance
        assert extra == block or half_width(iv, extra - block) >= distance
    # At 3 seeds and 2 df most of the width is the t quantile: far fewer seeds than the
    # 1/sqrt(n) rule alone says (it would say 9 more).
    assert seeds_to_settle(Interval(0.0, -0.5, 0.5, 0.95, 3, 2.0), 0.25, 1) == 2
    # Almost settled: at least one block more, never zero.
    assert seeds_to_settle(Interval(0.2, 0.01, 0.39, 0.95, 9, 8.0), 0.1, block=3) == 3
    # No boundary ahead (estimate and min_effect zero), no seeds yet, or beyond `most`.
    assert seeds_to_settle(Interval(0.0, -0.5, 0.5, 0.95, 3, 2.0), 0.0) is None
    assert seeds_to_settle(Interval(0.0, -1.0, 1.0, 0.95, 0, 0.0), 0.25) is None
    assert seeds_to_settle(Interval(0.0, -1.0, 1.0, 0.95, 3, 2.0), 1e-4, most=50) is None


def test_seeds_for_power_is_the_smallest_plan_whose_last_look_may_shelve_no_gain() -> None:
    for alpha, block in [(0.05, 3), (0.05, 2), (0.01, 4)]:
        seeds = seeds_for_power(alpha, block)
        looks = seeds // block
        plan = SequentialPlan(alpha, looks, block)
        assert detectable_gain(1.0, math.inf, seeds, plan.alpha_at(looks)) <= 1.5
        if looks > 1:
            fewer = SequentialPlan(alpha, looks - 1, block)
            assert detectable_gain(1.0, math.inf, fewer.max_seeds, fewer.alpha_at(looks - 1)) > 1.5
    assert seeds_for_power(0.05, 3) == 9
