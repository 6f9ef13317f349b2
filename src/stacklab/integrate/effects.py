"""Effects model: what each contribution does to one objective, alone and in pairs, with error bars.

Why this shape:

* **Paired by seed.** Every batch re-runs the baseline with the same seeds, and recipes run with
  one seed share its data order, init and eval sampling. So each seed gets its own intercept
  (a fixed effect):  y = alpha_seed + sum_i beta_i x_i + sum_(i<j) gamma_ij x_i x_j.
  Noise that a seed shares across recipes lands in alpha, never in the effects: a lucky seed
  does not make a contribution look good. The fit is least squares on the runs with each
  seed's mean removed (Frisch-Waugh-Lovell: the same betas as fitting the intercepts).
* **Only what the runs can tell.** A pair never run together carries no evidence about its
  interaction: it is left out of the model (`dropped_pairs`; its interaction is taken as zero).
  Terms that the runs cannot tell apart (two contributions always run together, one run in
  every recipe) keep the minimum-norm least-squares split, are marked `identified=False` and
  get no interval or test; `estimable(subset)` says whether a prediction is pinned down anyway.
* **Uncertainty by bootstrap.** With at least `CLUSTER_MIN_SEEDS` seeds, whole seeds are
  resampled with replacement (cluster bootstrap): it keeps all correlation inside a seed and
  assumes nothing about the noise. With fewer seeds a resample has too few distinct outcomes
  (10 for 3 seeds, 35 for 4) to draw a 95% interval from, so the fit's residuals are resampled
  instead, scaled by sqrt(N / df) for the degrees of freedom the fit used. That assumes the
  noise left after the seed effect is exchangeable across runs. With no residual degrees of
  freedom there is no estimate of the noise: draws equal the estimate and tests are NaN.
* **p-values from the same draws.** Two-sided bootstrap p-value: twice the share of draws on
  the far side of zero, with the usual +1 so it is never 0. It agrees with the percentile
  interval (p < 0.05 roughly when the 95% interval excludes 0) and respects the seed pairing,
  which OLS standard errors would not under the cluster bootstrap.
* **A guide, not a judge.** The engine uses this model to search and to credit; verdicts rest
  on direct seed-paired comparisons (verdicts.py), because the model takes every interaction
  it has not measured to be zero and its intervals can then miss by far.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

import numpy as np

Term = tuple[int, ...]  # (i,) a main effect; (i, j) with i < j an interaction
Bootstrap = Literal["cluster", "residual"]
K = TypeVar("K")
V = TypeVar("V", float, np.ndarray)

CLUSTER_MIN_SEEDS = 5  # fewer seeds: resample residuals, not seeds (see module docstring)
CLUSTER_MAX_TERMS = 120  # more terms: resample residuals (a refit per draw costs p^3)
_EIG_RTOL = 1e-10  # eigenvalues of a bootstrap Gram matrix below this x the largest count as 0
_ESTIMABLE_TOL = 1e-8
_CHUNK_ELEMENTS = 1 << 22  # bound on floats held at once by the batched bootstrap solve


class Observation(NamedTuple):
    """One finished run: the contributions applied, its seed and one objective's value."""

    subset: frozenset[int]
    seed: int
    value: float


@dataclass(frozen=True)
class Effect:
    """One coefficient: estimate, 95% percentile interval and bootstrap two-sided p-value.

    `low`, `high` and `p_value` are NaN when the term is not identified by the runs, or when
    the fit left no residual degrees of freedom to estimate the noise from.
    """

    term: Term
    estimate: float
    low: float
    high: float
    p_value: float
    identified: bool


@dataclass(frozen=True, eq=False)
class EffectsFit:
    """A fitted effects model for one objective; coefficients follow `terms`."""

    n: int
    terms: tuple[Term, ...]  # main effects (0,) .. (n-1,), then the kept pairs
    coef: np.ndarray  # [p]
    coef_draws: np.ndarray  # [draws, p], bootstrap
    baseline: float  # mean seed intercept: the baseline's level
    baseline_draws: np.ndarray  # [draws], drawn jointly with coef_draws
    seeds: tuple[int, ...]
    dropped_pairs: tuple[tuple[int, int], ...]  # requested pairs never run together
    effects: tuple[Effect, ...]  # one per term
    row_space: np.ndarray  # [rank, p] orthonormal basis of the contrasts the runs pin down
    bootstrap: Bootstrap
    residual_df: int
    noise_sd: float  # sqrt(RSS / df): one run's noise after the seed effect; NaN when df = 0

    @property
    def main_effects(self) -> dict[int, Effect]:
        return {e.term[0]: e for e in self.effects if len(e.term) == 1}

    @property
    def interactions(self) -> dict[tuple[int, int], Effect]:
        return {(e.term[0], e.term[1]): e for e in self.effects if len(e.term) == 2}

    def contrasts(self, subsets: Iterable[Iterable[int]]) -> np.ndarray:
        """Term indicators [m, p] of each subset: predicted delta vs baseline = row @ coef."""
        return _indicators([_check_subset(s, self.n) for s in subsets], self.terms, self.n)

    def predict_delta(self, subset: Iterable[int]) -> tuple[float, np.ndarray]:
        """Predicted difference from the baseline recipe (same seeds): estimate and [draws]."""
        c = self.contrasts([subset])[0]
        return float(c @ self.coef), self.coef_draws @ c

    def predict(self, subset: Iterable[int]) -> tuple[float, np.ndarray]:
        """Predicted level of the subset (baseline level + delta): estimate and [draws]."""
        delta, draws = self.predict_delta(subset)
        return self.baseline + delta, self.baseline_draws + draws

    def estimable_many(self, subsets: Iterable[Iterable[int]]) -> np.ndarray:
        """Bool [m]: is each subset's predicted delta determined by the runs (not by min-norm)?"""
        c = self.contrasts(subsets)
        off = c - (c @ self.row_space.T) @ self.row_space
        norm = np.linalg.norm(c, axis=1)
        return np.linalg.norm(off, axis=1) <= _ESTIMABLE_TOL * np.maximum(1.0, norm)

    def estimable(self, subset: Iterable[int]) -> bool:
        return bool(self.estimable_many([subset])[0])


def interaction_contrast(both: V, first: V, second: V, baseline: V) -> V:
    """y(i+j) - y(i) - y(j) + y(baseline): what i and j do together beyond each alone.

    The one definition of a pairwise interaction, whatever y is: a measured value per seed
    (the evidence behind a conflict, engine.py), a prediction or its draws (the model's
    gamma_ij for the utility, utility.py). In the pairwise model it is gamma_ij exactly.
    """
    return both - first - second + baseline


def fit_effects(
    obs: Iterable[Observation | tuple[Iterable[int], int, float]],
    n: int,
    interactions: Sequence[tuple[int, int]] | Literal["all"] | None = None,
    draws: int = 2000,
    rng_seed: int = 0,
) -> EffectsFit:
    """Fit main effects (+ the requested pairwise interactions) of `n` contributions.

    `interactions`: pairs to model, "all" pairs, or None (main effects only). Requested pairs
    never observed together are dropped and reported. Never fails on rank deficiency.
    `draws` bootstrap draws: whole seeds resampled with >= CLUSTER_MIN_SEEDS seeds, residuals
    otherwise (see the module docstring); `rng_seed` makes them reproducible.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    rows = [_check_observation(o, n, k) for k, o in enumerate(obs)]
    if not rows:
        raise ValueError("no observations to fit")
    subsets = [r.subset for r in rows]
    y = np.array([r.value for r in rows])  # [N]
    member = _indicators(subsets, [(i,) for i in range(n)], n)  # [N, n]
    seen_together = member.T @ member  # [n, n] runs containing both i and j
    pairs = _requested_pairs(interactions, n)
    kept = [p for p in pairs if seen_together[p] > 0]
    dropped = tuple(p for p in pairs if seen_together[p] == 0)
    terms: tuple[Term, ...] = tuple((i,) for i in range(n)) + tuple(kept)
    x = _indicators(subsets, terms, n)  # [N, p]
    n_obs = x.shape[0]

    seeds = tuple(sorted({r.seed for r in rows}))
    seed_idx = np.searchsorted(seeds, [r.seed for r in rows])  # [N]
    n_seeds = len(seeds)
    onehot = np.zeros((n_obs, n_seeds))
    onehot[np.arange(n_obs), seed_idx] = 1.0
    counts = onehot.sum(axis=0)  # [S]
    x_mean = (onehot.T @ x) / counts[:, None]  # [S, p]
    y_mean = (onehot.T @ y) / counts  # [S]
    xt = x - x_mean[seed_idx]  # within-seed deviations
    yt = y - y_mean[seed_idx]

    row_space, pinv = _row_space_and_pinv(xt)  # [r, p], [p, N]
    rank = row_space.shape[0]
    coef = pinv @ yt  # minimum-norm least squares
    baseline = float(np.mean(y_mean - x_mean @ coef))
    residual_df = n_obs - n_seeds - rank
    identified = np.abs(np.sum(row_space**2, axis=0) - 1.0) <= _ESTIMABLE_TOL  # diag of projector
    resid = yt - xt @ coef
    noise_sd = math.sqrt(float(resid @ resid) / residual_df) if residual_df > 0 else math.nan

    rng = np.random.default_rng(rng_seed)
    if n_seeds >= CLUSTER_MIN_SEEDS and len(terms) <= CLUSTER_MAX_TERMS:
        bootstrap: Bootstrap = "cluster"
        weights = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=draws)  # [D, S]
        coef_draws = _cluster_draws(xt, yt, seed_idx, n_seeds, weights.astype(float))
        alpha_draws = y_mean[None, :] - coef_draws @ x_mean.T  # [D, S]
        baseline_draws = (weights * alpha_draws).sum(axis=1) / n_seeds
    else:
        bootstrap = "residual"
        scaled = resid * math.sqrt(n_obs / residual_df) if residual_df > 0 else 0.0 * resid
        e = scaled[rng.integers(0, n_obs, size=(draws, n_obs))]  # [D, N]
        coef_draws = coef[None, :] + e @ pinv.T  # pinv ignores per-seed constants
        alpha_draws = y_mean[None, :] + (e @ onehot) / counts - coef_draws @ x_mean.T
        baseline_draws = alpha_draws.mean(axis=1)

    testable = bootstrap == "cluster" or residual_df > 0
    effects = tuple(
        _summarise(t, float(coef[k]), coef_draws[:, k], bool(identified[k]), testable)
        for k, t in enumerate(terms)
    )
    return EffectsFit(
        n=n,
        terms=terms,
        coef=coef,
        coef_draws=coef_draws,
        baseline=baseline,
        baseline_draws=baseline_draws,
        seeds=seeds,
        dropped_pairs=dropped,
        effects=effects,
        row_space=row_space,
        bootstrap=bootstrap,
        residual_df=residual_df,
        noise_sd=noise_sd,
    )


def _check_observation(o: object, n: int, k: int) -> Observation:
    try:
        subset, seed, value = o  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"observation {k} is not (subset, seed, value): {o!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"observation {k} has a non-finite value {value}")
    if int(seed) != seed:
        raise ValueError(f"observation {k} has a non-integer seed {seed!r}")
    return Observation(_check_subset(subset, n), int(seed), value)


def _check_subset(subset: Iterable[int], n: int) -> frozenset[int]:
    s = frozenset(int(i) for i in subset)
    bad = sorted(i for i in s if not 0 <= i < n)
    if bad:
        raise ValueError(f"contribution index {bad[0]} out of range 0..{n - 1}")
    return s


def _requested_pairs(
    interactions: Sequence[tuple[int, int]] | Literal["all"] | None, n: int
) -> list[tuple[int, int]]:
    if interactions is None:
        return []
    if isinstance(interactions, str):
        if interactions != "all":
            raise ValueError(
                f"interactions must be a list of pairs, 'all' or None: {interactions!r}"
            )
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    pairs = set()
    for a, b in interactions:
        if a == b or not (0 <= a < n and 0 <= b < n):
            raise ValueError(f"bad interaction pair ({a}, {b}) for {n} contributions")
        pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def _indicators(subsets: Sequence[frozenset[int]], terms: Sequence[Term], n: int) -> np.ndarray:
    member = np.zeros((len(subsets), n), dtype=bool)
    for r, s in enumerate(subsets):
        member[r, list(s)] = True
    first = np.array([t[0] for t in terms], dtype=int)
    last = np.array([t[-1] for t in terms], dtype=int)
    return (member[:, first] & member[:, last]).astype(float)


def _row_space_and_pinv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis [r, p] of x's row space and the pseudo-inverse [p, N] of x [N, p]."""
    n_obs, p = x.shape
    if p == 0 or not np.any(x):
        return np.zeros((0, p)), np.zeros((p, n_obs))
    u, sv, vt = np.linalg.svd(x, full_matrices=False)
    rank = int(np.sum(sv > sv[0] * max(n_obs, p) * np.finfo(float).eps))
    pinv = vt[:rank].T @ (u[:, :rank].T / sv[:rank, None])
    return vt[:rank], pinv


def _cluster_draws(
    xt: np.ndarray, yt: np.ndarray, seed_idx: np.ndarray, n_seeds: int, weights: np.ndarray
) -> np.ndarray:
    """Coefficients [D, p] refitted with each seed's runs counted `weights` [D, S] times.

    Weights are constant within a seed, so the within-seed deviations do not change and each
    refit is a weighted least squares: sum_s w_s (X_s'X_s) beta = sum_s w_s X_s'y_s, solved
    min-norm through an eigendecomposition, batched over draws.
    """
    p = xt.shape[1]
    gram = np.stack([xt[seed_idx == s].T @ xt[seed_idx == s] for s in range(n_seeds)])  # [S,p,p]
    moment = np.stack([xt[seed_idx == s].T @ yt[seed_idx == s] for s in range(n_seeds)])  # [S,p]
    out = np.zeros((weights.shape[0], p))
    if p == 0:
        return out
    chunk = max(1, _CHUNK_ELEMENTS // (p * p))
    for start in range(0, weights.shape[0], chunk):
        w = weights[start : start + chunk]
        g = np.tensordot(w, gram, axes=1)  # [c, p, p]
        b = w @ moment  # [c, p]
        lam, vec = np.linalg.eigh(g)
        keep = lam > _EIG_RTOL * np.maximum(lam[:, -1:], 0.0)
        inv = np.where(keep, 1.0 / np.where(keep, lam, 1.0), 0.0)
        proj = np.einsum("cpk,cp->ck", vec, b) * inv
        out[start : start + chunk] = np.einsum("cpk,ck->cp", vec, proj)
    return out


def _summarise(
    term: Term, estimate: float, draws: np.ndarray, identified: bool, testable: bool
) -> Effect:
    if not (identified and testable):
        return Effect(term, estimate, math.nan, math.nan, math.nan, identified)
    low, high = np.quantile(draws, [0.025, 0.975])
    return Effect(term, estimate, float(low), float(high), bootstrap_p_value(draws), True)


def bootstrap_p_value(draws: np.ndarray) -> float:
    """Two-sided p-value of "the quantity is 0" from its bootstrap draws [D]."""
    d = len(draws)
    below = int(np.sum(draws <= 0.0))
    above = int(np.sum(draws >= 0.0))
    return min(1.0, 2.0 * (min(below, above) + 1) / (d + 1))
