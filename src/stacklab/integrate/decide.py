"""Decisions: direct comparisons turned into accepted / shelved / undecided, with evidence.

The engine (engine.py) runs the comparisons; this module only reads them. Every verdict is
drawn from one direct comparison's interval (verdicts.py) and carries that comparison as its
evidence, so the reason a person reads, the interval shown and the verdict cannot disagree.
The order of the checks is the order of the reasons a shelved contribution gets: its runs
failed; a choice group; a guardrail shown breached; what its comparison inside (or added
to) the final recipe decided; else what its comparison alone showed on the screening seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stacklab.integrate.credit import MAX_PLAYERS, Credit, credit_with_intervals
from stacklab.integrate.planner import Subset
from stacklab.integrate.record import (
    ComparisonEvidence,
    CreditRow,
    CreditValues,
    Decision,
    Estimate,
    EvidenceItem,
    GuardrailCheck,
    GuardrailRecord,
    GuardState,
    InteractionEvidence,
    Kind,
    Status,
    finite,
)
from stacklab.integrate.select import Guardrail
from stacklab.integrate.store import Run
from stacklab.integrate.utility import UTILITY, UtilityDraws
from stacklab.integrate.verdicts import (
    Interval,
    SequentialPlan,
    Verdict,
    detectable_gain,
    seeds_for_power,
    seeds_to_settle,
)

if TYPE_CHECKING:
    from stacklab.integrate.engine import Views, _Session

SCREEN_LEVEL = 0.95  # level of the one-look screening comparisons (alone vs baseline)


@dataclass
class Comparison:
    """A direct comparison behind a verdict: recipe `a` minus recipe `b` on `seeds`.

    kind: "loo" (the final recipe minus it without `member`), "added" (the final recipe with
    `member` minus without it) or "alone" (`member` alone minus the baseline, on the
    screening seeds). `pool` and `pool_seeds`: the runs that gave the noise estimate.
    """

    kind: str
    member: int
    a: Subset
    b: Subset
    seeds: list[int]
    interval: Interval
    verdict: Verdict
    pool: list[Subset]
    pool_seeds: list[int] = field(default_factory=list)
    attempt: int = 0
    looks_left: int = 0  # looks the plan had left after this one


@dataclass
class GuardCheck:
    """One guardrail on the final recipe against the baseline: the mean margin's interval."""

    guardrail: Guardrail
    interval: Interval
    state: GuardState
    seeds: list[int]


@dataclass(frozen=True)
class Attempt:
    """One round of comparisons around one final recipe: each member's verdict and each
    guardrail's state when it ended."""

    recipe: list[int]
    comparisons: dict[int, Verdict]
    guardrails: dict[str, GuardState]


@dataclass
class Confirmation:
    """What the confirmation measured, and the recipe it ends with."""

    final: Subset
    plan: SequentialPlan
    tested: dict[int, Comparison] = field(default_factory=dict)  # latest comparison per member
    guards: list[GuardCheck] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)
    removed: dict[int, str] = field(default_factory=dict)  # member -> why it left the recipe
    history: dict[Subset, dict[int, Comparison]] = field(default_factory=dict)  # per recipe
    out_of_budget: bool = False
    powered: bool = True  # the plan's last look finds gains of POWER_TARGET sds (80% power)


class Evidence:
    """Turns the direct comparisons into decisions with reasons and evidence, and into credit."""

    def __init__(
        self, session: _Session, views: Views, conf: Confirmation, runs: Mapping[str, Run]
    ):
        self.s, self.rnd, self.views, self.conf = session, session.rnd, views, conf
        self.fits = views.full
        self.final = conf.final
        self.notes: list[str] = []
        self.ok_runs = dict.fromkeys(range(session.n), 0)
        self.errors: dict[int, str] = {}
        for p in session.points.values():
            run = runs[p.key]
            for i in p.subset:
                if run.status == "done":
                    self.ok_runs[i] += 1
                elif run.status == "failed" and run.error:
                    self.errors.setdefault(i, run.error)
        self.discoveries: dict[tuple[int, str], bool] = {}
        for i in range(session.n):
            alone = session.alone(i)
            for m in self.rnd.metrics:
                iv = self._metric_interval(alone, m) if alone else None
                self.discoveries[(i, m)] = bool(iv and (iv.low > 0 or iv.high < 0))

    # -- quantities

    def _metric_interval(self, c: Comparison, metric: str) -> Interval:
        s = self.s
        noise = s._noise(c.pool, c.pool_seeds, metric) if c.pool else None
        return s.paired(c.a, c.b, c.seeds, metric, c.interval.level, noise)

    def item(self, c: Comparison) -> EvidenceItem:
        """An evidence entry of decision.json: recipe a minus recipe b, per metric and utility."""
        ids = self.rnd.ids
        if c.kind == "interaction":  # y(i+y) - y(i) - y(y) + y(baseline) on screening seeds
            i, y = sorted(c.a)
            metrics: dict[str, Estimate] = {}
            for m in self.rnd.metrics:
                iv = self.s.interaction(i, y, m)
                metrics[m] = finite(iv.as_list()) if iv else (None, None, None)
            return InteractionEvidence(
                comparison="interaction",
                pair=[ids[i], ids[y]],
                seeds=c.seeds,
                level=c.interval.level,
                verdict=c.verdict,
                utility=finite(c.interval.as_list()),
                metrics=metrics,
            )
        return ComparisonEvidence(
            comparison=c.kind,  # type: ignore[arg-type]
            a=[ids[i] for i in sorted(c.a)],
            b=[ids[i] for i in sorted(c.b)],
            seeds=c.seeds,
            level=c.interval.level,
            verdict=c.verdict,
            utility=finite(c.interval.as_list()),
            metrics={m: finite(self._metric_interval(c, m).as_list()) for m in self.rnd.metrics},
        )

    def describe(self, c: Comparison) -> str:
        """Per-objective change (and the utility, with several objectives) at c's level."""
        parts = [
            f"{o.name} {self._metric_interval(c, o.name).text()}"
            for o in self.rnd.objectives
            if o.weight > 0
        ]
        if len(parts) > 1 or not parts:
            parts.append(f"utility {c.interval.text()}")
        level = f"{100 * c.interval.level:.3g}%"
        return "; ".join(parts) + f" ({len(c.seeds)} seeds, {level} interval)"

    def predicted(self, subset: Subset) -> dict[str, Estimate]:
        """Final recipe vs baseline on the confirmation seeds, each pair's own noise (95%)."""
        seeds = [x for b in self.conf.blocks for x in b] or self.rnd.seeds
        out: dict[str, Estimate] = {}
        for m in [*self.rnd.metrics, UTILITY]:
            if not subset:
                out[m] = (0.0, 0.0, 0.0)
                continue
            iv = self.s.paired(subset, frozenset(), seeds, m, 0.95)
            out[m] = finite(iv.as_list())
        return out

    def guardrail_checks(self) -> list[GuardrailCheck]:
        """Each guardrail on the final recipe: held, breached or open, with the margin's interval
        and the largest breach the runs rule out (the interval's far end)."""
        out = []
        for c in self.conf.guards:
            g = c.guardrail
            out.append(
                GuardrailCheck(
                    metric=g.metric,
                    state=c.state,
                    margin=finite(c.interval.as_list()),
                    level=c.interval.level,
                    seeds=c.seeds,
                    text=_guard_state_text(c),
                )
            )
            if c.state == "open":
                self.notes.append(
                    f"guardrail on {g.metric} ({guard_rule(g)}) undecided for the final recipe: "
                    f"{_guard_state_text(c)}"
                )
        return out

    # -- decisions

    def decide(self, i: int) -> Decision:
        c = self.rnd.contributions[i]
        status, kind, reason, evidence = self._verdict(i)
        return Decision(
            id=c.id,
            blind_id=self.rnd.blind[c.id],
            area=c.area,
            summary=c.summary,
            status=status,
            kind=kind,
            reason=reason,
            evidence=[self.item(x) for x in evidence if x.interval.n > 0],
        )

    def _verdict(self, i: int) -> tuple[Status, Kind, str, list[Comparison]]:
        rnd, s, ids = self.rnd, self.s, self.rnd.ids
        alone = s.alone(i)
        alone_ev = [alone] if alone else []
        if self.ok_runs[i] == 0:
            error = self.errors.get(i, "no run finished")
            return (
                "shelved",
                "failed",
                f"every run with it failed: {error.splitlines()[0][:300]}",
                [],
            )
        tested = self.conf.tested.get(i)
        if i in self.final and tested is not None:
            if tested.verdict == "accept":
                how = {
                    "loo": "leave-one-out",
                    "added": "measured added to it",
                    "swap": "measured in place of its choice-group rival",
                }[tested.kind]
                text = self.describe(tested)
                return (
                    "accepted",
                    "accepted",
                    (
                        f"gain inside the final recipe ({how}): {text}; min_effect "
                        f"{s.min_effect:.3g} utility"
                    ),
                    [tested, *alone_ev],
                )
            if tested.verdict == "open":
                return "undecided", "undecided", self._undecided(tested), [tested, *alone_ev]
        for group in rnd.groups:
            rivals = sorted(self.final.intersection(group)) if i in group else []
            if rivals:
                y = rivals[0]
                text = (
                    f"conflicts with {ids[y]}: {rnd.conflict(i, y)} (a choice group), "
                    f"and the final recipe takes {ids[y]}"
                )
                if tested is not None and tested.kind == "swap" and tested.interval.n:
                    text += f"; swapped in for it: {self.describe(tested)}"
                    if tested.verdict == "open":
                        text += f" (undecided; {self._undecided(tested)})"
                    return "shelved", "conflict", text, [tested, *alone_ev]
                return "shelved", "conflict", text, alone_ev
        removed = self.conf.removed.get(i, "")
        if removed.startswith("guardrail:"):
            metric = removed.split(":", 1)[1]
            g = next(x for x in rnd.guardrails if x.metric == metric)
            return (
                "shelved",
                "guardrail",
                (
                    f"regresses {metric} beyond its guardrail ({guard_rule(g)}) in "
                    "combination: the final recipe with it breaks the guardrail"
                ),
                [x for x in (tested, alone) if x],
            )
        for check in s.guard_checks(frozenset({i}), rnd.seeds):
            if check.state == "breached":
                g = check.guardrail
                return (
                    "shelved",
                    "guardrail",
                    (
                        f"regresses {g.metric} beyond its guardrail ({guard_rule(g)}): "
                        f"{_margin_text(g)} {check.interval.text()} alone, below 0 "
                        f"({len(check.seeds)} seeds)"
                    ),
                    alone_ev,
                )
        alone_text = self.describe(alone) if alone else "not measured"
        helps_alone = alone is not None and alone.verdict == "accept"
        if tested is not None:
            where = (
                "inside the final recipe" if tested.kind == "loo" else "added to the final recipe"
            )
            change = self.describe(tested)
            if tested.verdict == "open":
                return "undecided", "undecided", self._undecided(tested), [tested, *alone_ev]
            if tested.verdict == "harm":
                culprit = self._culprit(i)
                if culprit is not None:
                    y, text, inter = culprit
                    return (
                        "shelved",
                        "conflict",
                        (f"conflicts with {ids[y]}: interaction {text}; {where}: {change}"),
                        [tested, inter, *alone_ev],
                    )
                return (
                    "shelved",
                    "conflict",
                    (f"conflicts with the final recipe: {where}: {change}"),
                    [tested, *alone_ev],
                )
            if tested.verdict == "small":
                return (
                    "shelved",
                    "too_small",
                    (
                        f"gain too small to keep: {where} {change}, below min_effect "
                        f"{s.min_effect:.3g} utility"
                    ),
                    [tested, *alone_ev],
                )
            if tested.verdict == "none" and helps_alone:
                return (
                    "shelved",
                    "vanishes",
                    (f"gain vanishes in combination: alone {alone_text}; {where} {change}"),
                    [tested, *alone_ev],
                )
            if tested.verdict == "none":
                return (
                    "shelved",
                    "no_gain",
                    f"no measurable gain {where}: {change}",
                    [
                        tested,
                        *alone_ev,
                    ],
                )
            return (
                "shelved",
                "not_selected",
                (
                    f"helps {where} ({change}) but the round ended before a recipe with it was "
                    "confirmed"
                ),
                [tested, *alone_ev],
            )
        if alone is None:
            return "undecided", "undecided", "undecided: it never ran alone", []
        if helps_alone:
            runs = 2 * s.rnd.confirm_count * self.conf.plan.looks
            return (
                "undecided",
                "undecided",
                (
                    f"undecided: helps alone ({alone_text}) but was never measured added to the "
                    f"final recipe (the budget ran out); about {runs} more runs would settle it"
                ),
                alone_ev,
            )
        if alone.interval.high < 0:
            return "shelved", "no_gain", f"no gain, a net loss: {alone_text} alone", alone_ev
        if alone.verdict == "small":
            return (
                "shelved",
                "too_small",
                (
                    f"gain too small to keep: alone {alone_text}, below min_effect "
                    f"{s.min_effect:.3g} utility"
                ),
                alone_ev,
            )
        power = detectable_gain(
            s.noise_floor.get(UTILITY, math.nan), alone.interval.df, len(alone.seeds),
            1.0 - SCREEN_LEVEL,
        )  # fmt: skip
        return (
            "shelved",
            "no_gain",
            (
                f"no measurable gain: {alone_text} alone; gains above {power:.3g} utility "
                "would have shown with 80% power"
            ),
            alone_ev,
        )

    def _undecided(self, c: Comparison) -> str:
        """Why a comparison is open, and about how many more runs would settle it: both
        recipes on more seeds, until its interval clears the nearer boundary at its current
        estimate and spread, or until the seed count at which a powered plan's last look may
        shelve "no gain", whichever comes first."""
        block, plan = self.rnd.confirm_count, self.conf.plan
        seeds = seeds_to_settle(c.interval, self.s.min_effect, block) if c.interval.n else None
        # The seeds at which a last look may shelve "no gain": this plan's last look, or, when
        # the budget could not pay for a powered plan, the smallest powered one.
        last = plan.looks * block if self.conf.powered else seeds_for_power(plan.alpha, block)
        to_last = max(block, last - c.interval.n)
        seeds = to_last if seeds is None else min(seeds, to_last)
        more = f"about {2 * seeds} more runs would settle it"
        what = {
            "loo": "leave-one-out inside the final recipe",
            "added": "added to the final recipe",
            "swap": "in place of its choice-group rival",
        }[c.kind]
        shown = self.describe(c) if c.interval.n else "not measured (the budget ran out)"
        return f"undecided: {what} {shown}; {more}"

    def _culprit(self, i: int) -> tuple[int, str, Comparison] | None:
        """The final member whose measured interaction with i is shown to hurt the most."""
        best: tuple[float, int, str, Comparison] | None = None
        for y in sorted(self.conf.final - {i}):
            iv = self.s.interaction(i, y, UTILITY)
            if iv is None or not iv.high < 0:
                continue
            if best is None or iv.estimate < best[0]:
                text = "; ".join(
                    f"{o.name} {ivm.text()}"
                    for o in self.rnd.objectives
                    if o.weight > 0 and (ivm := self.s.interaction(i, y, o.name)) is not None
                )
                seeds = [
                    x for x in self.rnd.seeds if x in self.s.series(frozenset({i, y}), [x], UTILITY)
                ]
                comp = Comparison(
                    "interaction", i, frozenset({i, y}), frozenset(), seeds, iv, "harm", []
                )
                best = (iv.estimate, y, text, comp)
        return None if best is None else (best[1], best[2], best[3])

    # -- credit

    def credit(self) -> dict[str, dict[int, Credit]]:
        """Shapley/Banzhaf credit in the final model, on the full fit, per objective and utility."""
        n = len(self.rnd.ids)
        if len(self.final) + 1 > MAX_PLAYERS:
            self.notes.append(f"credit skipped: more than {MAX_PLAYERS - 1} selected contributions")
            return {}
        shelved = [i for i in range(n) if i not in self.final and self.ok_runs[i] > 0]
        out: dict[str, dict[int, Credit]] = {}
        for o in self.rnd.objectives:
            out[o.name] = credit_with_intervals(self.fits[o.name], self.final, shelved)
        util = UtilityDraws(self.fits, self.s.objectives)
        out[UTILITY] = credit_with_intervals(util, self.final, shelved)
        return out

    def credit_table(self, credit: Mapping[str, Mapping[int, Credit]]) -> list[CreditRow]:
        """The one place authors appear: after every decision is made."""
        rows = []
        for i, c in enumerate(self.rnd.contributions):
            if not credit or i not in credit[UTILITY]:
                continue
            values = {metric: CreditValues.of(table[i]) for metric, table in credit.items()}
            status = "accepted" if i in self.final else "shelved"
            rows.append(CreditRow(id=c.id, author=c.author, status=status, **values))
        return rows


def guard_rule(g: Guardrail | GuardrailRecord) -> str:
    """A guardrail as written in the round file, in words."""
    if g.kind == "ratio":
        op = ">=" if g.direction == "max" else "<="
        return f"{op} {g.threshold:g} x baseline"
    worse, better = ("fall", "rise") if g.direction == "max" else ("rise", "fall")
    if g.threshold <= 0:
        return f"may {worse} at most {abs(g.threshold):g}"
    return f"must {better} at least {g.threshold:g}"


def _margin_text(g: Guardrail) -> str:
    """What the guardrail's margin is, in words (>= 0 where it holds)."""
    if g.kind == "ratio":
        sign = "" if g.direction == "max" else "-"
        return f"margin {sign}({g.metric} - {g.threshold:g} x baseline)"
    return f"margin of the change in {g.metric} over the allowed {g.threshold:g}"


def _guard_state_text(c: GuardCheck) -> str:
    g, iv = c.guardrail, c.interval
    text = f"{_margin_text(g)} {iv.text()} ({len(c.seeds)} seeds)"
    if c.state == "held":
        return f"holds: {text}"
    if c.state == "breached":
        return f"breached: {text}"
    return f"{text}: the runs rule out a breach larger than {-iv.low:.3g} only"
