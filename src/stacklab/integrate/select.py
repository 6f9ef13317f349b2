"""Selection: which allowed subset of contributions makes the whole model best.

Why this shape:

* **Only recipes that can exist.** Contributions that set the same key are a choice group: at
  most one of each group. `candidate_subsets` enumerates every subset the groups allow (capped:
  past `MAX_CANDIDATES` there are too many to enumerate). `count_subsets` counts them without
  enumerating, and `search_candidates` returns a short list worth scoring when a round is too
  big to score every subset (see its docstring): 2^n subsets x thousands of bootstrap draws
  costs minutes and gigabytes at n = 16, while the fitted model is a quadratic in the members
  whose good regions a beam search finds in milliseconds.
* **Pareto first, then one choice.** The Pareto front shows every trade-off no other subset
  beats on all objectives at once; the choice then needs a stated exchange rate: the utility
  (utility.py) of the predicted changes from the baseline, sum_k weight_k * sign_k * delta_k /
  scale_k, with sign_k = +1 for "max", -1 for "min" objectives.
* **Scale = one run's noise.** Unless an objective gives its own `scale`, delta_k is divided by
  the fit's residual noise sd (seed-paired, so seed-to-seed level shifts do not inflate it):
  a weight then buys "one run's worth of noise" of that metric, whatever its unit. A noise-free
  fit has no such unit and falls back to 1 (the metric's own unit; `objective_scale`).
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

import functools
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from stacklab.errors import StacklabError
from stacklab.integrate.effects import EffectsFit
from stacklab.integrate.utility import objective_scale, sign, utility

Direction = Literal["max", "min"]
GuardrailKind = Literal["min_delta", "ratio"]
K = TypeVar("K", bound=Hashable)

MAX_CANDIDATES = 1 << 16
SEARCH_TOP = 3  # best subsets found whose whole 1-move neighbourhood search_candidates returns
_SEARCH_POOL = 4  # x beam: best subsets (by point estimate) whose guardrails are checked on draws
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
        s = sign(self.direction)
        if self.kind == "min_delta":
            return s * delta >= self.threshold
        return s * (baseline + delta - self.threshold * baseline) >= 0.0


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
    conflicts = _conflict_masks(n, groups)
    limit = n if max_size is None else max_size
    masks: list[int] = []

    def extend(start: int, mask: int, size: int) -> None:
        masks.append(mask)
        if len(masks) > MAX_CANDIDATES:
            raise StacklabError(
                f"{n} contributions allow more than {MAX_CANDIDATES} candidate subsets: "
                "too many to enumerate; use search_candidates"
            )
        if size >= limit:
            return
        for i in range(start, n):
            if not conflicts[i] & mask:
                extend(i + 1, mask | (1 << i), size + 1)

    extend(0, 0, 0)
    subsets = [frozenset(i for i in range(n) if m >> i & 1) for m in masks]
    return sorted(subsets, key=lambda s: (len(s), sorted(s)))


def count_subsets(n: int, groups: Sequence[Sequence[int]]) -> int:
    """How many subsets `candidate_subsets(n, groups)` allows, counted without listing them.

    Why: a caller must know whether a round can be scored exhaustively before it tries.
    Allowed subsets are the independent sets of the conflict graph (an edge joins two members
    of a group), so the count is the product over its connected components. A component is
    counted by branching on its member with most conflicts (subsets without it, plus subsets
    with it and none of its conflicts), memoised on the members left: a group of k disjoint
    from the others costs k branches (k + 1 subsets), overlapping groups a little more;
    components are small in practice, and a contribution in no group is a factor of 2.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    conflicts = _conflict_masks(n, groups)

    @functools.cache
    def within(mask: int) -> int:  # independent sets of the graph induced on `mask`
        if not mask:
            return 1
        rest = _components(mask, conflicts)
        if len(rest) > 1:
            return math.prod(within(c) for c in rest)
        v = max(_bits(mask), key=lambda i: ((conflicts[i] & mask).bit_count(), -i))
        without = mask & ~(1 << v)
        return within(without) + within(without & ~conflicts[v])

    return math.prod(within(c) for c in _components((1 << n) - 1, conflicts))


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
    signed = v * np.array([sign(d) for d in directions])
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

    m = len(cands)
    contrasts = {k: fits[k].contrasts(cands) for k in metrics}  # [m, p_k]
    deltas = {k: contrasts[k] @ fits[k].coef for k in metrics}  # [m]
    expected = utility(deltas, objectives, scales)  # [m]
    estimable = np.all([fits[k].estimable_many(cands) for k in metrics], axis=0)
    prob_better = np.empty(m)
    guard_prob = np.empty(m)
    chunk = max(1, _CHUNK_ELEMENTS // d)
    for lo in range(0, m, chunk):
        sl = slice(lo, lo + chunk)
        draws = {k: contrasts[k][sl] @ fits[k].coef_draws.T for k in metrics}  # [c, D]
        u = utility(draws, objectives, scales)  # [c, D]
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
        key=lambda r: (-expected[r], len(cands[r]), sorted(cands[r])),
    )
    table = [
        Candidate(
            subset=c,
            expected_utility=float(expected[r]),
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


def search_candidates(
    fits: Mapping[str, EffectsFit],
    objectives: Sequence[Objective],
    guardrails: Sequence[Guardrail],
    n: int,
    groups: Sequence[Sequence[int]],
    must_include: Iterable[frozenset[int]] = (),
    limit: int = 4096,
    prob: float = 0.95,
    beam: int = 8,
) -> list[frozenset[int]]:
    """Candidate subsets worth scoring with `choose`: all of them when few, a searched list else.

    With at most `limit` allowed subsets this is `candidate_subsets(n, groups)`, unchanged.
    Past that, scoring every subset over every bootstrap draw costs minutes and gigabytes (and
    refuses past `MAX_CANDIDATES`), while the fitted model's point estimate of the utility is a
    quadratic in the members (main effects and pairs), cheap to evaluate for hundreds of
    subsets at once. So the fit is searched on that point estimate (never the draws):

    1. Beam search: from the baseline, add one contribution at a time (a member of a choice
       group swaps out the members it conflicts with), keeping the best `beam` subsets of
       each size. Ranking: point-estimate guardrails hold first, then utility.
    2. Exchange: from the `SEARCH_TOP` best subsets of the beam, take the best improving move
       (add one, drop one, swap one in for one out) until no move improves.
    3. The best found: the `_SEARCH_POOL * beam` best subsets seen are checked on the draws
       (share of draws in which every guardrail holds >= `prob`, as `choose` requires), and
       the `SEARCH_TOP` best, those passing first, are the top.

    Returned: the baseline, every singleton, `must_include` (e.g. the subsets already run),
    every subset kept in the beam at some size, the subsets the exchange moved through, and
    the whole 1-move neighbourhood of the top (so `choose` and the planner see what a single
    change would do, feasible by point estimate or not: `choose` filters by probability).
    At most max(`limit`, 1 + n + len(must_include) + SEARCH_TOP) subsets: the baseline,
    singletons, `must_include` and the top are always kept; the rest, best first, fill up
    to `limit`. Sorted like `candidate_subsets`; every subset respects the choice groups.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    conflicts = _conflict_masks(n, groups)
    must = [frozenset(int(i) for i in s) for s in must_include]
    for s in must:
        bad = sorted(i for i in s if not 0 <= i < n)
        if bad:
            raise ValueError(f"must_include subset {sorted(s)} names {bad[0]}, not in 0..{n - 1}")
        clash = next((i for i in sorted(s) if any(s & _member_set(conflicts[i]))), None)
        if clash is not None:
            raise ValueError(
                f"must_include subset {sorted(s)} takes {clash} and a member of its choice group"
            )
    if count_subsets(n, groups) <= limit:
        return candidate_subsets(n, groups)

    model = _PointModel(fits, objectives, guardrails, n)
    conf = np.zeros((n, n), dtype=bool)
    for i in range(n):
        conf[i, list(_bits(conflicts[i]))] = True
    seen = _Visited(model)

    # 1. Beam search, one more contribution per level.
    level = np.zeros((1, n), dtype=bool)
    kept = set(seen.visit(level))
    for size in range(1, n + 1):
        idx = seen.visit(np.concatenate([_adds(s, conf) for s in level]))
        grown = sorted({i for i in idx if seen.size[i] == size}, key=seen.rank)[:beam]
        if not grown:
            break
        kept.update(grown)
        level = seen.rows(grown)

    # 2. Exchange moves from the beam's best, best improvement first, until none improves.
    path: set[int] = set()
    for start in sorted(kept, key=seen.rank)[:SEARCH_TOP]:
        cur = start
        for _ in range(4 * n + 4):  # each move strictly improves the rank: a safety bound only
            best = min(seen.visit(_moves(seen.rows([cur])[0], conf)), key=seen.rank)
            if seen.rank(best) >= seen.rank(cur):
                break
            cur = best
            path.add(cur)

    # 3. The top, checked on the draws, and its neighbourhood.
    pool = sorted(range(len(seen)), key=seen.rank)[: max(_SEARCH_POOL * beam, SEARCH_TOP)]
    safe = model.guardrail_prob(seen.rows(pool)) >= prob
    top = [i for _, i in sorted(zip(~safe, pool, strict=True), key=lambda t: t[0])][:SEARCH_TOP]
    near: set[int] = set()
    for i in top:
        near.update(seen.visit(_moves(seen.rows([i])[0], conf)))

    always = [frozenset(), *must, *(frozenset({i}) for i in range(n))]
    always += [seen.subset(i) for i in top]
    rest = [seen.subset(i) for i in sorted(kept | path | near, key=seen.rank)]
    out = dict.fromkeys(always)
    room = max(0, limit - len(out))
    out.update(dict.fromkeys([s for s in rest if s not in out][:room]))
    return sorted(out, key=lambda s: (len(s), sorted(s)))


def _check_direction(direction: str, what: str) -> None:
    if direction not in ("max", "min"):
        raise StacklabError(f"{what}: direction must be 'max' or 'min', got {direction!r}")


def _check_fits(fits: Mapping[str, EffectsFit], metrics: Sequence[str]) -> None:
    missing = [k for k in metrics if k not in fits]
    if missing:
        raise StacklabError(f"no effects fit for metric {missing[0]!r} (have {sorted(fits)})")


class _PointModel:
    """Point-estimate utility and guardrail checks of subsets given as member rows [m, n].

    A subset's predicted delta of a metric is its term indicators (a main effect is on when
    its contribution is in, a pair when both are: `EffectsFit.contrasts`) @ the fit's coef;
    built here straight from boolean member rows, so no Python loop per subset.
    """

    def __init__(
        self,
        fits: Mapping[str, EffectsFit],
        objectives: Sequence[Objective],
        guardrails: Sequence[Guardrail],
        n: int,
    ):
        objectives = list(objectives)
        if not objectives:
            raise StacklabError("selection needs at least one objective")
        self.guardrails = list(guardrails)
        metrics = list(dict.fromkeys([o.name for o in objectives] + [g.metric for g in guardrails]))
        _check_fits(fits, metrics)
        for m in metrics:
            if fits[m].n != n:
                raise ValueError(f"the fit of {m!r} is for {fits[m].n} contributions, not {n}")
        self.fits = fits
        self.terms = {
            m: (
                np.array([t[0] for t in fits[m].terms], dtype=int),
                np.array([t[-1] for t in fits[m].terms], dtype=int),
            )
            for m in metrics
        }
        self.objectives = objectives
        self.scales = {o.name: objective_scale(fits[o.name], o) for o in objectives}

    def contrasts(self, metric: str, member: np.ndarray) -> np.ndarray:
        first, last = self.terms[metric]
        return (member[:, first] & member[:, last]).astype(float)  # [m, p]

    def score(self, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Utility [m] and "every guardrail holds" [m], both on point estimates."""
        delta = {k: self.contrasts(k, member) @ self.fits[k].coef for k in self.terms}
        expected = utility(delta, self.objectives, self.scales)
        ok = np.ones(member.shape[0], dtype=bool)
        for g in self.guardrails:
            ok &= g.holds(delta[g.metric], np.full(member.shape[0], self.fits[g.metric].baseline))
        return np.asarray(expected, dtype=float), ok

    def guardrail_prob(self, member: np.ndarray) -> np.ndarray:
        """Share of draws in which every guardrail holds [m], as `choose` computes it."""
        if not self.guardrails:
            return np.ones(member.shape[0])
        ok: np.ndarray | bool = True
        for g in self.guardrails:
            fit = self.fits[g.metric]
            draws = self.contrasts(g.metric, member) @ fit.coef_draws.T  # [m, D]
            ok = ok & g.holds(draws, fit.baseline_draws[None, :])
        return np.mean(ok, axis=1)


class _Visited:
    """Every subset the search has scored: member rows, utility, point feasibility, rank."""

    def __init__(self, model: _PointModel):
        self.model = model
        self.index: dict[bytes, int] = {}
        self._rows: list[np.ndarray] = []
        self.utility: list[float] = []
        self.ok: list[bool] = []
        self.size: list[int] = []
        self._keys: list[tuple[bool, float, int, tuple[int, ...]]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def visit(self, member: np.ndarray) -> list[int]:
        """Indices of these rows, scoring (in one batch) the ones not seen before."""
        keys = [row.tobytes() for row in member]
        first: dict[bytes, int] = {}
        for r, k in enumerate(keys):
            if k not in self.index:
                first.setdefault(k, r)
        fresh = list(first.values())
        if fresh:
            utility, ok = self.model.score(member[fresh])
            for r, u, f in zip(fresh, utility, ok, strict=True):
                row = member[r].copy()
                self.index[keys[r]] = len(self._rows)
                self._rows.append(row)
                members = tuple(int(i) for i in np.flatnonzero(row))
                self.utility.append(float(u))
                self.ok.append(bool(f))
                self.size.append(len(members))
                self._keys.append((not f, -float(u), len(members), members))
        return [self.index[k] for k in keys]

    def rank(self, i: int) -> tuple[bool, float, int, tuple[int, ...]]:
        """Sort key, best first: guardrails hold (point estimate), utility, fewer, members."""
        return self._keys[i]

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        return np.stack([self._rows[i] for i in idx])

    def subset(self, i: int) -> frozenset[int]:
        return frozenset(self._keys[i][3])


def _adds(s: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Rows [k, n]: `s` plus each contribution not in it, minus what that one conflicts with."""
    ins = np.flatnonzero(~s)
    out = s[None, :] & ~conf[ins]
    out[np.arange(len(ins)), ins] = True
    return out


def _moves(s: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Every 1-move neighbour of `s`: add one (swapping within its group), drop one, swap one."""
    ins, outs = np.flatnonzero(~s), np.flatnonzero(s)
    drops = np.repeat(s[None, :], len(outs), axis=0)
    drops[np.arange(len(outs)), outs] = False
    into, away = (a.ravel() for a in np.meshgrid(ins, outs, indexing="ij"))
    swaps = np.repeat(s[None, :], len(into), axis=0)
    swaps[np.arange(len(away)), away] = False
    swaps &= ~conf[into]
    swaps[np.arange(len(into)), into] = True
    return np.concatenate([_adds(s, conf), drops, swaps])


def _conflict_masks(n: int, groups: Sequence[Sequence[int]]) -> list[int]:
    """Bitmask per contribution of the others it shares a choice group with."""
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
    return conflicts


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _member_set(mask: int) -> frozenset[int]:
    return frozenset(_bits(mask))


def _components(mask: int, conflicts: Sequence[int]) -> list[int]:
    """Connected components (bitmasks) of the conflict graph induced on `mask`."""
    out = []
    while mask:
        comp = frontier = mask & -mask
        while frontier:
            reach = 0
            for i in _bits(frontier):
                reach |= conflicts[i]
            frontier = reach & mask & ~comp
            comp |= frontier
        out.append(comp)
        mask &= ~comp
    return out
