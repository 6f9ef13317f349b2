"""Credit: how much of the final model's gain each contribution earned, with intervals.

Why this shape:

* **Shapley, exactly.** A contribution's worth depends on what else ships (interactions), so
  credit is its marginal gain averaged over every order of adding the final contributions: the
  Shapley value. The credits add up to the whole gain, v(final) - v(baseline) (efficiency), and
  an interaction is split equally between its two partners. With at most `MAX_PLAYERS`
  players it is computed exactly by enumerating subsets; no sampling noise on top of the
  measurement noise. Banzhaf (every subset of the others equally likely, no efficiency) is the
  second view. For the pairwise effects model the two coincide: beta_i + 1/2 sum_j gamma_ij
  over the partners j present; they differ for value functions of higher order.
* **Linear in the game.** Both values are fixed linear maps of the table of v over all
  subsets, so credit for every bootstrap draw is one matrix product: intervals come from the
  same joint draws as the effects.
* **Credit for shelved work.** A shelved contribution i is credited with what it would have
  earned had it shipped: its Shapley/Banzhaf value in the game over final + {i}. Its
  `marginal` is the measured effect of adding it to the final recipe, v(final + {i}) -
  v(final); for a final contribution `marginal` is its leave-one-out effect, v(final) -
  v(final - {i}). Work shelved for a conflict (a choice group) is a prediction of a recipe that
  cannot be built, from the fitted model alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from stacklab.integrate.effects import EffectsFit

MAX_PLAYERS = 16
DrawsValue = Callable[[frozenset[int]], tuple[float, np.ndarray]]
_CHUNK_SUBSETS = 1024  # subsets evaluated at once: bounds memory to 1024 x draws floats


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% percentile interval over the bootstrap draws."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Credit:
    """Credit of one contribution; see the module docstring for shelved contributions."""

    contribution: int
    status: Literal["final", "shelved"]
    shapley: Interval
    banzhaf: Interval
    marginal: Interval


def shapley(
    value_fn: Callable[[frozenset[int]], float], players: Sequence[int]
) -> dict[int, float]:
    """Exact Shapley value of each player of the game `value_fn` (evaluated on all subsets)."""
    players = _check_players(players)
    values = np.array([value_fn(s) for s in _subsets(players)])
    return dict(zip(players, (values @ _operator(len(players), "shapley")).tolist(), strict=True))


def banzhaf(
    value_fn: Callable[[frozenset[int]], float], players: Sequence[int]
) -> dict[int, float]:
    """Exact Banzhaf value: mean marginal gain of each player over all subsets of the others."""
    players = _check_players(players)
    values = np.array([value_fn(s) for s in _subsets(players)])
    return dict(zip(players, (values @ _operator(len(players), "banzhaf")).tolist(), strict=True))


def credit_with_intervals(
    value: EffectsFit | DrawsValue,
    final: Iterable[int],
    shelved: Iterable[int] = (),
) -> dict[int, Credit]:
    """Shapley/Banzhaf/marginal credit with 95% intervals for final and shelved contributions.

    `value` is a fitted effects model (its predicted delta vs the baseline is the game) or any
    function subset -> (estimate, draws [D]), such as `utility.UtilityDraws(...)`.
    """
    final_set = frozenset(int(i) for i in final)
    shelved_list = sorted({int(i) for i in shelved})
    overlap = final_set.intersection(shelved_list)
    if overlap:
        raise ValueError(f"contribution {min(overlap)} is both final and shelved")
    players = sorted(final_set)
    out: dict[int, Credit] = {}
    est, draws = _game_credit(value, players)
    for b, i in enumerate(players):
        out[i] = _credit(i, "final", est, draws, b, len(players))
    for i in shelved_list:
        est, draws = _game_credit(value, [*players, i])
        out[i] = _credit(i, "shelved", est, draws, len(players), len(players) + 1)
    return out


def _credit(
    i: int, status: Literal["final", "shelved"], est: np.ndarray, draws: np.ndarray, b: int, k: int
) -> Credit:
    """Pick player b's Shapley, Banzhaf and marginal columns (laid out as in `_game_credit`)."""
    sh, bz, mg = (_interval(est[c], draws[:, c]) for c in (b, k + b, 2 * k + b))
    return Credit(i, status, sh, bz, mg)


def _game_credit(
    value: EffectsFit | DrawsValue, players: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Shapley | Banzhaf | leave-one-out marginal of each player: estimates [3k], draws [D, 3k].

    All three are linear in the table of v over subsets, so each chunk of subsets adds its
    part and the whole table (2^k x D) is never held at once.
    """
    players = _check_players(players)
    k = len(players)
    subsets = _subsets(players)
    loo = np.zeros((1 << k, k))  # v(all) - v(all but b)
    full = (1 << k) - 1
    loo[full, :] = 1.0
    loo[[full & ~(1 << b) for b in range(k)], range(k)] -= 1.0
    ops = np.concatenate([_operator(k, "shapley"), _operator(k, "banzhaf"), loo], axis=1)
    est = np.zeros(3 * k)
    draws: np.ndarray | None = None
    for lo in range(0, len(subsets), _CHUNK_SUBSETS):
        means, table = _evaluate(value, subsets[lo : lo + _CHUNK_SUBSETS])  # [c], [c, D]
        est += means @ ops[lo : lo + _CHUNK_SUBSETS]
        part = table.T @ ops[lo : lo + _CHUNK_SUBSETS]
        if draws is not None and part.shape != draws.shape:
            raise ValueError("value function must return the same number of draws for every subset")
        draws = part if draws is None else draws + part
    assert draws is not None  # there is always the empty subset
    return est, draws


def _evaluate(
    value: EffectsFit | DrawsValue, subsets: list[frozenset[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """The game on `subsets`: estimates [m] and draws [m, D]."""
    if isinstance(value, EffectsFit):
        c = value.contrasts(subsets)
        return c @ value.coef, c @ value.coef_draws.T
    results = [value(s) for s in subsets]
    means = np.array([float(m) for m, _ in results])
    draws = np.array([np.asarray(d, dtype=float) for _, d in results])
    if draws.ndim != 2:
        raise ValueError("value function must return draws of the same length for every subset")
    return means, draws


def _interval(estimate: float, draws: np.ndarray) -> Interval:
    low, high = np.quantile(draws, [0.025, 0.975])
    return Interval(float(estimate), float(low), float(high))


def _check_players(players: Sequence[int]) -> list[int]:
    players = [int(p) for p in players]
    if len(set(players)) != len(players):
        raise ValueError(f"players repeat: {players}")
    if len(players) > MAX_PLAYERS:
        raise ValueError(f"exact credit enumerates 2^k subsets; k = {len(players)} > {MAX_PLAYERS}")
    return players


def _subsets(players: list[int]) -> list[frozenset[int]]:
    """All subsets, indexed by bitmask: bit b of the index set means players[b] is in."""
    k = len(players)
    return [frozenset(p for b, p in enumerate(players) if mask >> b & 1) for mask in range(1 << k)]


def _operator(k: int, kind: Literal["shapley", "banzhaf"]) -> np.ndarray:
    """Matrix A [2^k, k] with value[i] = sum_S v(S) A[S, i], for v indexed by bitmask."""
    masks = np.arange(1 << k)
    size = np.array([bin(m).count("1") for m in masks])
    if kind == "shapley":
        # weight of a coalition of s others: s! (k - s - 1)! / k!
        w = np.array([1.0 / (k * math.comb(k - 1, s)) for s in range(k)])
    else:
        w = np.full(k, 1.0 / 2 ** (k - 1)) if k else np.zeros(0)
    a = np.zeros((1 << k, k))
    for b in range(k):
        without = masks[(masks >> b) & 1 == 0]
        a[without | (1 << b), b] += w[size[without]]
        a[without, b] -= w[size[without]]
    return a
