"""Verdicts: the tests behind "accepted", "shelved" and "undecided", sized for 3-12 seeds.

The effects model (effects.py) guides the search; a verdict rests on direct comparisons
instead: recipe a against recipe b, run on the same seeds, where neither took part in
choosing. Why each piece is the way it is:

* **Paired differences, Student's t.** Recipes run with one seed share its data order, init
  and evaluation draws, so the per-seed difference y_a(s) - y_b(s) removes that shared shift
  exactly, whatever its size. The interval is mean +- t(df) * se. With 3-6 seeds a normal
  quantile (or a bootstrap, which behaves like one) is far too narrow: t(0.975, 2) is 4.30,
  not 1.96. Simulation over the seed counts rounds use (tests/test_integrate_verdicts.py,
  docs/benchmarks.md) shows these intervals cover at their stated level.
* **Whose noise.** `paired_interval` estimates the noise from the comparison's own
  differences (df = n - 1): right whatever the other recipes' noise is, but wide with few
  seeds. `pooled_noise` estimates one run's noise from a group of recipes on the same seeds
  (recipe + seed, two-way), which buys degrees of freedom at the price of assuming those
  recipes are equally noisy. The engine pools only recipes that are one contribution apart
  (the final recipe and its leave-one-outs and add-ones, or the screening recipes against
  the baseline) and never pools the baseline with the final recipe: a round's baseline and
  its final recipe can differ in noise twofold (the demo's Muon rows are twice as steady
  as its baseline).
* **Sequential looks, error spent in advance.** A comparison that is still undecided gets
  more seeds, a block at a time, up to `looks` blocks. Looking after every block and
  stopping when the interval is clear would inflate the error (optional stopping), so each
  look spends its own share of alpha and the shares sum to alpha: by the union bound, the
  chance that any look's interval misses is at most alpha, whenever the round stops. The
  interim looks spend a quarter of alpha between them (a clear effect stops early); the
  last look spends three quarters, so the final test loses little power to the looks.
  Every interval carries the level it was drawn at, and the verdict is read off that
  interval: they cannot disagree.
* **Parsimony.** A member is worth keeping only when its gain is significant (low > 0) and
  at least `min_effect` (the smallest gain worth the added complexity). A comparison is
  decided early when the interval is clearly on one side: accepted, shown to hurt
  (high < 0), or shown below `min_effect` (high < min_effect). At the last look it is
  decided either way, with the power the plan printed up front.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

Verdict = Literal["accept", "harm", "small", "none", "open"]
POWER = 0.8  # the power the up-front plan quotes
POWER_TARGET = 1.5  # a last look may shelve "no gain" only if it finds this many noise sds
MAX_PLAN_LOOKS = 16  # blocks of confirmation seeds a comparison may get (the budget binds first)


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval at `level`, from `n` seeds."""

    estimate: float
    low: float
    high: float
    level: float
    n: int
    df: float

    def as_list(self) -> list[float]:
        return [self.estimate, self.low, self.high]

    def text(self) -> str:
        return fmt(self.estimate, self.low, self.high)


def fmt(estimate: float | None, low: float | None, high: float | None) -> str:
    """`+0.123 [+0.045, +0.2]`: the one way an estimate and its interval are printed, in the
    reasons of decision.json and in the reports alike.

    An unbounded end prints as -inf or +inf, also when it comes as null from decision.json
    (JSON has no infinity); an unknown number (NaN, or a null estimate) as n/a, and an
    interval with no finite number at all as plain `n/a`. Float dust, a number a billion
    times smaller than the largest one shown (sums of float terms leave 1e-17 where the exact
    value is 0), prints as 0.
    """
    values = (estimate, -math.inf if low is None else low, math.inf if high is None else high)
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    tol = 1e-9 * max(finite)

    def one(v: float | None) -> str:
        if v is None or math.isnan(v):
            return "n/a"
        return f"{0.0 if abs(v) <= tol else v:+.3g}"

    est, lo, hi = (one(v) for v in values)
    return f"{est} [{lo}, {hi}]"


def t_interval(mean: float, se: float, df: float, level: float, n: int) -> Interval:
    """mean +- t(df) * se; with no noise estimate (df <= 0 or se NaN) the interval is unbounded."""
    if df <= 0 or not math.isfinite(se):
        return Interval(mean, -math.inf, math.inf, level, n, df)
    q = float(stats.t.ppf(0.5 + level / 2.0, df))
    return Interval(mean, mean - q * se, mean + q * se, level, n, df)


def paired_interval(
    diffs: Sequence[float],
    level: float,
    noise: tuple[float, float] | None = None,
    terms: int = 2,
) -> Interval:
    """Interval of the mean of per-seed differences.

    `noise` = (sd of one run, its df) from `pooled_noise`: a per-seed value made of `terms`
    runs with unit weights (2 for a difference, 4 for an interaction contrast) then has sd
    * sqrt(terms). Without it the values' own spread is used (df = n - 1).
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, level, 0, 0)
    mean = float(d.mean())
    if noise is not None:
        sd, df = noise
        return t_interval(mean, sd * math.sqrt(terms / n), df, level, n)
    if n < 2:
        return Interval(mean, -math.inf, math.inf, level, n, 0)
    return t_interval(mean, float(d.std(ddof=1)) / math.sqrt(n), n - 1, level, n)


def pooled_noise(obs: Sequence[tuple[object, int, float]]) -> tuple[float, float]:
    """(sd of one run, df) after a recipe effect and a seed effect, from (recipe, seed, y).

    Least squares on recipe + seed indicators (works for unbalanced designs); df = runs minus
    the rank of the design. (NaN, 0) when nothing is left to estimate the noise from.
    """
    if not obs:
        return math.nan, 0.0
    recipes = {r: k for k, r in enumerate(dict.fromkeys(o[0] for o in obs))}
    seeds = {s: k for k, s in enumerate(dict.fromkeys(o[1] for o in obs))}
    x = np.zeros((len(obs), len(recipes) + len(seeds)))
    for row, (r, s, _) in enumerate(obs):
        x[row, recipes[r]] = 1.0
        x[row, len(recipes) + seeds[s]] = 1.0
    y = np.array([o[2] for o in obs], dtype=float)
    coef, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    df = len(obs) - int(rank)
    if df <= 0:
        return math.nan, 0.0
    resid = y - x @ coef
    return math.sqrt(float(resid @ resid) / df), float(df)


@dataclass(frozen=True)
class SequentialPlan:
    """Looks of `block` seeds each, at most `looks` of them; alpha spent across the looks."""

    alpha: float
    looks: int
    block: int

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.looks < 1 or self.block < 1:
            raise ValueError(f"looks and block must be >= 1, got {self.looks}, {self.block}")

    @property
    def max_seeds(self) -> int:
        return self.looks * self.block

    def alpha_at(self, look: int) -> float:
        """Alpha spent at look 1..looks: a quarter over the interim looks, the rest at the last."""
        if not 1 <= look <= self.looks:
            raise ValueError(f"look {look} outside 1..{self.looks}")
        if self.looks == 1:
            return self.alpha
        if look < self.looks:
            return self.alpha / (4.0 * (self.looks - 1))
        return 0.75 * self.alpha

    def level_at(self, look: int) -> float:
        return 1.0 - self.alpha_at(look)


def verdict(iv: Interval, min_effect: float, final: bool) -> Verdict:
    """Read a decision off a gain's interval (larger is better).

    accept: significant and at least `min_effect`; harm: shown to hurt; small: shown (or, at
    the last look, left) below `min_effect` while significantly positive; none: no gain shown;
    open: not decided yet (more seeds would decide it).
    """
    if iv.low > 0 and iv.estimate >= min_effect:
        return "accept"
    if iv.high < 0:
        return "harm"
    if iv.high < min_effect or final:
        return "small" if iv.low > 0 else "none"
    return "open"


def seeds_to_settle(
    iv: Interval, min_effect: float, block: int = 1, most: int = 100_000
) -> int | None:
    """More seeds an open comparison needs, at its current estimate and per-seed spread, for
    its interval to clear the boundary nearer its estimate (zero above min_effect: accepted;
    min_effect below it: too small or no gain), in whole blocks; None when there is no
    boundary ahead to aim at (an estimate of exactly zero with min_effect zero) or more than
    `most` seeds would be needed.

    The interval is read as t(level, df) * sd / sqrt(n): with n' seeds its half-width is
    t(level, df + n' - n) * sd / sqrt(n') (the noise is pooled, so each seed adds a degree of
    freedom). The level stays this look's, so the count is an estimate, not a promise.
    """
    half = (iv.high - iv.low) / 2.0
    target = iv.estimate if iv.estimate >= min_effect else min_effect - iv.estimate
    if iv.n < 1 or iv.df <= 0 or not math.isfinite(half) or not target > 0:
        return None
    tail = 0.5 + iv.level / 2.0
    sd = half / float(stats.t.ppf(tail, iv.df)) * math.sqrt(iv.n)
    block = max(1, block)

    def settles(blocks: int) -> bool:  # the half-width falls as seeds are added
        extra = blocks * block
        return float(stats.t.ppf(tail, iv.df + extra)) * sd / math.sqrt(iv.n + extra) < target

    if not settles(most // block):
        return None
    low, high = 0, most // block  # settles(high); not settles(low) unless low == 0
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if settles(mid) else (mid, high)
    return high * block


def seeds_for_power(alpha: float, block: int, target: float = POWER_TARGET) -> int:
    """Confirmation seeds a sequential plan (looks of `block` seeds, `alpha` spent over them)
    needs for its last look to find gains of `target` noise sds with 80% power, the condition
    for that look to shelve "no gain"; at most MAX_PLAN_LOOKS looks."""
    for looks in range(1, MAX_PLAN_LOOKS + 1):
        plan = SequentialPlan(alpha, looks, block)
        if detectable_gain(1.0, math.inf, plan.max_seeds, plan.alpha_at(looks)) <= target:
            return plan.max_seeds
    return MAX_PLAN_LOOKS * block


def detectable_gain(
    noise_sd: float, df: float, n_seeds: int, alpha: float, power: float = POWER
) -> float:
    """The smallest paired gain found with probability `power` on `n_seeds` seeds at `alpha`
    (two-sided): (t_{1-alpha/2} + t_{power}) * sd * sqrt(2 / n)."""
    if not (math.isfinite(noise_sd) and n_seeds > 0):
        return math.nan
    dof = df if df > 0 else max(1, n_seeds - 1)
    q = float(stats.t.ppf(1.0 - alpha / 2.0, dof) + stats.t.ppf(power, dof))
    return q * noise_sd * math.sqrt(2.0 / n_seeds)


def guard_margins(
    kind: str, threshold: float, sign: float, final: Mapping[int, float], base: Mapping[int, float]
) -> list[float]:
    """Per-seed margin of a guardrail (>= 0 where it holds), on the seeds both recipes ran.

    min_delta: sign * (y - y_base) - threshold; ratio: sign * (y - threshold * y_base). Both
    are linear in the runs, so the mean margin's interval is an ordinary paired interval.
    """
    seeds = sorted(set(final) & set(base))
    if kind == "min_delta":
        return [sign * (final[s] - base[s]) - threshold for s in seeds]
    return [sign * (final[s] - threshold * base[s]) for s in seeds]
