"""Selection: which allowed subset of contributions makes the whole model best.

Why this shape:

* **Only recipes that can exist.** Contributions that set the same key are a choice group: at
  most one of each group. `candidate_subsets` enumerates every subset the groups allow (capped:
  past `MAX_CANDIDATES` the round is too big to search exhaustively and must be split).
* **Pareto first, then one choice.** The Pareto front shows every trade-off no other subset
  beats on all objectives at once; the choice then needs a stated exchange rate: utility =
  sum_k weight_k * sign_k * delta_k / scale_k, with delta_k the predicted change from the
  baseline and sign_k = +1 for "max", -1 for "min" objectives.
* **Scale = one run's noise.** Unless an objective gives its own `scale`, delta_k is divided by
  the fit's residual noise sd (seed-paired, so seed-to-seed level shifts do not inflate it):
  a weight then buys "one run's worth of noise" of that metric, whatever its unit. A noise-free
  fit has no such unit and falls back to 1 (the metric's own unit).
* **Expected utility is the fitted prediction.** Utility is linear in the deltas, so the
  point predictions give it directly; the bootstrap draws give the probabilities. Draws are
  joint within a fit, and across fits fitted on the same runs (same order) with the same
  `rng_seed`: draw d then resamples the same seeds (or residual rows) for every metric.
* **Guardrails hold with high probability, not on average.** A candidate is feasible when the
  share of draws in which every guardrail holds is >= `prob`, and when the runs determine its
  prediction (`EffectsFit.estimable`). The baseline is always feasible, so there is always an
  answer, and "change nothing" wins whenever nothing is both better and safe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from stacklab.errors import StacklabError
from stacklab.integrate.effects import EffectsFit

Direction = Literal["max", "min"]
GuardrailKind = Literal["min_delta", "ratio"]
K = TypeVar("K", bound=Hashable)

MAX_CANDIDATES = 1 << 16
_CHUNK_ELEMENTS = 1 << 22  # bound on floats held at once when scoring candidates over draws


@dataclass(frozen=True)
class Objective:
    """An objective to optimise; `scale` (optional) is its unit in the utility."""

    name: str
    direction: Direction = "max"
    weight: float = 1.0
    scale: float | None = None

    def __post_init__(self) -> None:
        _check_direction(self.direction, f"objective {self.name!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise StacklabError(f"objective {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise StacklabError(f"objective {self.name!r}: scale must be > 0, got {self.scale}")


@dataclass(frozen=True)
class Guardrail:
    """A limit on how much worse than the baseline a metric may get.

    "min_delta": sign * (value - baseline) >= threshold, e.g. threshold -0.01 on a "max" metric
    lets it fall at most 0.01 (on a "min" metric: rise at most 0.01).
    "ratio": value >= threshold * baseline for a "max" metric (e.g. 0.9: keep 90%), value <=
    threshold * baseline for a "min" metric (e.g. 1.1: at most 10% more); for positive metrics.
    """

    metric: str
    kind: GuardrailKind
    threshold: float
    direction: Direction = "max"

    def __post_init__(self) -> None:
        _check_direction(self.direction, f"guardrail on {self.metric!r}")
        if self.kind not in ("min_delta", "ratio"):
            raise StacklabError(
                f"guardrail on {self.metric!r}: kind must be 'min_delta' or 'ratio', "
                f"got {self.kind!r}"
            )
        if not math.isfinite(self.threshold):
            raise StacklabError(f"guardrail on {self.metric!r}: threshold must be finite")

    def holds(self, delta: np.ndarray, baseline: np.ndarray) -> np.ndarray:
        """Bool, elementwise: does the guardrail hold for these deltas and baseline levels?"""
        sign = _sign(self.direction)
        if self.kind == "min_delta":
            return sign * delta >= self.threshold
        return sign * (baseline + delta - self.threshold * baseline) >= 0.0


@dataclass(frozen=True)
class Candidate:
    """One row of the selection table."""

    subset: frozenset[int]
    expected_utility: float
    prob_better: float  # share of draws with utility > 0 (better than the baseline)
    guardrail_prob: float  # share of draws in which every guardrail holds
    deltas: dict[str, float]  # predicted change from the baseline, per objective/guarded metric
    estimable: bool
    feasible: bool
    pareto: bool


@dataclass(frozen=True)
class Choice:
    """The chosen subset, the whole candidate table and the Pareto front."""

    chosen: frozenset[int]
    candidates: list[Candidate]
    pareto: list[frozenset[int]]
    scales: dict[str, float]
    prob: float


def candidate_subsets(
    n: int, groups: Sequence[Sequence[int]] = (), max_size: int | None = None
) -> list[frozenset[int]]:
    """Every subset of 0..n-1 with at most one member of each choice group (and <= max_size).

    Groups may overlap (a contribution can conflict with several others). Sorted by size, then
    by members; the empty subset (the baseline) comes first.
    """
    conflicts = [0] * n
    for g in groups:
        members = {int(i) for i in g}
        bad = sorted(i for i in members if not 0 <= i < n)
        if bad:
            raise ValueError(
                f"choice group {list(g)} names contribution {bad[0]}, not in 0..{n - 1}"
            )
        mask = sum(1 << i for i in members)
        for i in members:
            conflicts[i] |= mask & ~(1 << i)
    limit = n if max_size is None else max_size
    masks: list[int] = []

    def extend(start: int, mask: int, size: int) -> None:
        masks.append(mask)
        if len(masks) > MAX_CANDIDATES:
            raise StacklabError(
                f"{n} contributions allow more than {MAX_CANDIDATES} candidate subsets; "
                "set a max size, add choice groups or split the round"
            )
        if size >= limit:
            return
        for i in range(start, n):
            if not conflicts[i] & mask:
                extend(i + 1, mask | (1 << i), size + 1)

    extend(0, 0, 0)
    subsets = [frozenset(i for i in range(n) if m >> i & 1) for m in masks]
    return sorted(subsets, key=lambda s: (len(s), sorted(s)))


def pareto_front(points: Mapping[K, Sequence[float]], directions: Sequence[Direction]) -> list[K]:
    """Keys of the points no other point dominates (>= on every objective, > on one).

    Equal points do not dominate each other, so ties are all kept. Keys keep input order.
    """
    keys = list(points)
    if not keys:
        return []
    for d in directions:
        _check_direction(d, "pareto_front")
    v = np.array([np.asarray(points[k], dtype=float) for k in keys])  # [m, d]
    if v.ndim != 2 or v.shape[1] != len(directions):
        raise ValueError(f"points must each have {len(directions)} values (one per direction)")
    if not np.all(np.isfinite(v)):
        raise ValueError("pareto_front: points must be finite")
    signed = v * np.array([_sign(d) for d in directions])
    # Descending lexicographic order: anything dominating a point comes before it, and a point
    # dominated by a dominated point is dominated by a front point, so check the front only.
    order = np.lexsort(signed.T[::-1])[::-1]
    front: list[int] = []
    for idx in order:
        f = signed[front]
        beaten = np.any(np.all(f >= signed[idx], axis=1) & np.any(f > signed[idx], axis=1))
        if not beaten:
            front.append(int(idx))
    return [keys[i] for i in sorted(front)]


def objective_scale(fit: EffectsFit, objective: Objective) -> float:
    """The unit of `objective` in the utility: its own scale, else the fit's noise sd, else 1."""
    if objective.scale is not None:
        return objective.scale
    sd = fit.noise_sd
    if math.isfinite(sd) and sd > 1e-12 * max(1.0, abs(fit.baseline)):
        return sd
    return 1.0


def utility_fn(
    fits: Mapping[str, EffectsFit],
    objectives: Sequence[Objective],
    scales: Mapping[str, float] | None = None,
) -> Callable[[Iterable[int]], tuple[float, np.ndarray]]:
    """subset -> (utility vs baseline, [draws]), e.g. to credit contributions for the utility."""
    objectives = list(objectives)
    if not objectives:
        raise StacklabError("a utility needs at least one objective")
    _check_fits(fits, [o.name for o in objectives])
    scale = {o.name: objective_scale(fits[o.name], o) for o in objectives}
    scale.update(scales or {})

    def utility(subset: Iterable[int]) -> tuple[float, np.ndarray]:
        subset = frozenset(subset)
        total, draws = 0.0, np.zeros(fits[objectives[0].name].coef_draws.shape[0])
        for o in objectives:
            mean, d = fits[o.name].predict_delta(subset)
            factor = o.weight * _sign(o.direction) / scale[o.name]
            total, draws = total + factor * mean, draws + factor * d
        return total, draws

    return utility


def choose(
    fits: Mapping[str, EffectsFit],
    objectives: Sequence[Objective],
    guardrails: Sequence[Guardrail],
    candidates: Iterable[Iterable[int]],
    prob: float = 0.95,
) -> Choice:
    """The candidate with the highest expected utility among those whose guardrails all hold
    with probability >= `prob` (the baseline, the empty subset, is always allowed)."""
    objectives, guardrails = list(objectives), list(guardrails)
    if not objectives:
        raise StacklabError("selection needs at least one objective")
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        raise StacklabError(f"objective names repeat: {names}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    metrics = list(dict.fromkeys(names + [g.metric for g in guardrails]))
    _check_fits(fits, metrics)
    n_draws = {fits[m].coef_draws.shape[0] for m in metrics}
    if len(n_draws) != 1:
        raise ValueError(f"fits have different numbers of draws: {sorted(n_draws)}")
    (d,) = n_draws

    cands = list(dict.fromkeys(frozenset(c) for c in candidates))
    if frozenset() not in cands:
        cands.insert(0, frozenset())
    scales = {o.name: objective_scale(fits[o.name], o) for o in objectives}
    factors = {o.name: o.weight * _sign(o.direction) / scales[o.name] for o in objectives}

    m = len(cands)
    contrasts = {k: fits[k].contrasts(cands) for k in metrics}  # [m, p_k]
    deltas = {k: contrasts[k] @ fits[k].coef for k in metrics}  # [m]
    utility = sum(factors[k] * deltas[k] for k in names)
    estimable = np.all([fits[k].estimable_many(cands) for k in metrics], axis=0)
    prob_better = np.empty(m)
    guard_prob = np.empty(m)
    chunk = max(1, _CHUNK_ELEMENTS // d)
    for lo in range(0, m, chunk):
        sl = slice(lo, lo + chunk)
        draws = {k: contrasts[k][sl] @ fits[k].coef_draws.T for k in metrics}  # [c, D]
        u = sum(factors[k] * draws[k] for k in names)
        prob_better[sl] = np.mean(u > 0.0, axis=1)
        ok = np.ones_like(u, dtype=bool)
        for g in guardrails:
            ok &= g.holds(draws[g.metric], fits[g.metric].baseline_draws[None, :])
        guard_prob[sl] = ok.mean(axis=1)

    feasible = estimable & (guard_prob >= prob)
    feasible[cands.index(frozenset())] = True
    front = pareto_front(
        {c: [deltas[k][r] for k in names] for r, c in enumerate(cands) if estimable[r]},
        [o.direction for o in objectives],
    )
    on_front = set(front)
    best = min(
        (r for r in range(m) if feasible[r]),
        key=lambda r: (-utility[r], len(cands[r]), sorted(cands[r])),
    )
    table = [
        Candidate(
            subset=c,
            expected_utility=float(utility[r]),
            prob_better=float(prob_better[r]),
            guardrail_prob=float(guard_prob[r]),
            deltas={k: float(deltas[k][r]) for k in metrics},
            estimable=bool(estimable[r]),
            feasible=bool(feasible[r]),
            pareto=c in on_front,
        )
        for r, c in enumerate(cands)
    ]
    return Choice(chosen=cands[best], candidates=table, pareto=front, scales=scales, prob=prob)


def _sign(direction: Direction) -> float:
    return 1.0 if direction == "max" else -1.0


def _check_direction(direction: str, what: str) -> None:
    if direction not in ("max", "min"):
        raise StacklabError(f"{what}: direction must be 'max' or 'min', got {direction!r}")


def _check_fits(fits: Mapping[str, EffectsFit], metrics: Sequence[str]) -> None:
    missing = [k for k in metrics if k not in fits]
    if missing:
        raise StacklabError(f"no effects fit for metric {missing[0]!r} (have {sorted(fits)})")
