"""The utility: one number that ranks recipes judged on several objectives.

utility = sum_k weight_k * sign_k * value_k / scale_k, with sign_k = +1 for a "max" objective
and -1 for a "min" one, and value_k a metric of one run, a predicted change from the baseline
or a bootstrap draw of one. Why it lives in one module: the engine's verdicts (the utility of
each finished run), the selection's scores and the planner's proposals (the utility of the
effects model's predictions and draws) and the credit must be the same function of the same
units, or a verdict could disagree with the choice it confirms. `scale_k` is the objective's
own `scale`, else one run's noise of the metric (`objective_scale`), so a weight buys "one
run's worth of noise" of that metric, whatever its unit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from stacklab.errors import StacklabError
from stacklab.integrate.effects import EffectsFit, interaction_contrast

if TYPE_CHECKING:
    from stacklab.integrate.select import Direction, Objective

UTILITY = "utility"  # the utility's name beside the metrics' (in evidence, noise floors, credit)
V = TypeVar("V", float, np.ndarray)


def sign(direction: Direction) -> float:
    """+1 where higher is better ("max"), -1 where lower is ("min")."""
    return 1.0 if direction == "max" else -1.0


def objective_scale(fit: EffectsFit, objective: Objective) -> float:
    """The unit of `objective` in the utility: its own scale, else the fit's noise sd, else 1."""
    if objective.scale is not None:
        return objective.scale
    sd = fit.noise_sd
    if math.isfinite(sd) and sd > 1e-12 * max(1.0, abs(fit.baseline)):
        return sd
    return 1.0


def utility(
    values: Mapping[str, V],
    objectives: Sequence[Objective],
    scales: Mapping[str, float] | None = None,
) -> V:
    """The utility of `values` (metric -> a number, or an array of them, elementwise).

    Each objective's unit is `scales[name]` when given, else the objective's own `scale`,
    which must then be set (the engine fixes every scale after screening).
    """
    total: V = 0.0  # type: ignore[assignment]
    for o in objectives:
        scale = scales[o.name] if scales is not None else o.scale
        if scale is None:
            raise StacklabError(f"objective {o.name!r} has no scale for the utility")
        total = total + o.weight * sign(o.direction) / scale * values[o.name]
    return total


class UtilityDraws:
    """Predicted utility vs the baseline of subsets, from effects fits, with their joint
    bootstrap draws (cached per subset): the game the engine searches, prunes and credits."""

    def __init__(self, fits: Mapping[str, EffectsFit], objectives: Sequence[Objective]):
        self.objectives = list(objectives)
        if not self.objectives:
            raise StacklabError("a utility needs at least one objective")
        missing = [o.name for o in self.objectives if o.name not in fits]
        if missing:
            raise StacklabError(f"no effects fit for metric {missing[0]!r} (have {sorted(fits)})")
        self.fits = fits
        self.scales = {o.name: objective_scale(fits[o.name], o) for o in self.objectives}
        self._cache: dict[frozenset[int], tuple[float, np.ndarray]] = {}

    def __call__(self, subset: Iterable[int]) -> tuple[float, np.ndarray]:
        """U(subset) - U(baseline): the estimate and its draws [D]."""
        key = frozenset(subset)
        if key not in self._cache:
            deltas = {o.name: self.fits[o.name].predict_delta(key) for o in self.objectives}
            mean = utility({k: m for k, (m, _) in deltas.items()}, self.objectives, self.scales)
            draws = utility({k: d for k, (_, d) in deltas.items()}, self.objectives, self.scales)
            self._cache[key] = (float(mean), np.asarray(draws, dtype=float))
        return self._cache[key]

    def diff(self, a: Iterable[int], b: Iterable[int]) -> tuple[float, np.ndarray]:
        """U(a) - U(b): estimate and draws."""
        ma, da = self(a)
        mb, db = self(b)
        return ma - mb, da - db

    def interaction(self, i: int, j: int) -> float:
        """The model's interaction of i and j in the utility (its estimate)."""
        both, first, second, base = (self(s)[0] for s in ({i, j}, {i}, {j}, ()))
        return interaction_contrast(both, first, second, base)
