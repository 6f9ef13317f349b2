"""Scale ladders: decisions that hold at more than one model size.

A round with `scales:` names rungs, smallest first; each rung's patch goes on top of the
baseline and of every subset. How the engine spends a ladder (why it is built this way):

* **The first rung searches.** Screening, the model-guided search and the sequential
  confirmation run at the smallest rung, where runs are cheap, exactly as in a round
  without a ladder (engine.py), on the first rung's share of the budget.
* **A larger rung re-decides what matters.** It measures the recipe the rung below chose
  against the baseline, each member's leave-one-out, and the *close calls*: contributions
  the rung below left out without ruling out a gain of `min_effect` (undecided, or an
  interval whose upper end reaches it, not shown to hurt). The same sequential looks, level,
  utility units and `min_effect` as the first rung, on seeds no lower rung used, so two
  rungs' effects are in the same units and no seed that chose a recipe also judges it.
* **The largest rung measured decides.** A contribution's verdict comes from the largest
  rung at which it was compared; one never measured above the first rung keeps that
  rung's verdict. When a member's verdict changes between rungs the reason says so
  ("helps at s (...), hurts at m (...)"), and decision.json carries its effect at every rung.
* **Budget in cost units.** Each rung has a cost per run (given, or measured from run
  times: the median duration of the rung's first runs over the first rung's screening
  runs) and a share of the budget; what a rung leaves unspent passes to the next.
* **Learning rate, the usual confound.** With `lr_tuning`, the top rung first runs the
  baseline and the chosen recipe over a small grid on seeds of their own, and then compares
  the baseline at its best value with every other recipe at the chosen recipe's. A
  contribution that only moves the learning rate then changes nothing, and is shelved as
  such instead of being credited for tuning.

Every quantity is a function of the stored runs, so a killed ladder resumes where it was.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from stacklab.integrate.decide import Comparison, Confirmation, Evidence
from stacklab.integrate.planner import Subset, fresh_seeds, screening_design
from stacklab.integrate.record import (
    Agreement,
    ComparisonEvidence,
    Decision,
    Estimate,
    GuardrailCheck,
    LadderRecord,
    LrCurve,
    LrTuning,
    Pattern,
    RungComparison,
    RungRecord,
    Transfer,
    finite,
)
from stacklab.integrate.round import Round, Rung
from stacklab.integrate.store import run_key
from stacklab.integrate.utility import UTILITY
from stacklab.recipe import get_dotted

if TYPE_CHECKING:
    from stacklab.integrate.engine import DesignRun, RoundResult, RunBatch, Searched, _Session

AGREEMENT_DRAWS = 2000  # bootstrap draws of Kendall's tau between two rungs
AGREEMENT_LEVEL = 0.95


@dataclass
class RungOutcome:
    """What one rung measured: its session, the confirmation around its recipe and the
    decisions drawn from it (contribution index -> decision, for those it compared)."""

    rung: Rung
    session: _Session
    cost: float
    units: float  # budgeted, leftovers of lower rungs included
    chosen: Subset  # the recipe it started from
    close: list[int]
    conf: Confirmation | None = None
    evidence: Evidence | None = None
    decisions: dict[int, Decision] = field(default_factory=dict)
    same: list[int] = field(default_factory=list)  # members that change nothing here (lr)
    note: str | None = None  # why nothing was measured

    @property
    def runs(self) -> int:
        return self.session.used

    @property
    def kept(self) -> Subset:
        """The members of the rung's final recipe it did not shelve (accepted or undecided):
        the recipe the next rung starts from."""
        if self.conf is None:
            return self.chosen
        return frozenset(
            i
            for i in self.conf.final
            if i in self.decisions and self.decisions[i].status in ("accepted", "undecided")
        )

    @property
    def spent(self) -> float:
        return self.runs * self.cost


class LadderOutcome:
    """The upper rungs of a round, and how their verdicts replace the first rung's."""

    def __init__(self, first: _Session, found: Searched, rungs: list[RungOutcome]):
        self.first, self.found, self.rungs = first, found, rungs
        self.rnd: Round = first.rnd
        self.notes: list[str] = []
        self.lr_tuning: LrTuning | None = None

    @property
    def points(self) -> list[DesignRun]:
        return [p for r in self.rungs[1:] for p in r.session.points.values()]

    @property
    def batches(self) -> list[RunBatch]:
        return [b for r in self.rungs[1:] for b in r.session.batches]

    # -- per-contribution evidence across rungs

    def comparison(self, k: int, i: int) -> Comparison | None:
        """i's comparison at rung k: inside (or added to) the rung's recipe, else, at the first
        rung, alone against the baseline on the screening seeds."""
        r = self.rungs[k]
        c = r.conf.tested.get(i) if r.conf is not None else None
        if c is None and k == 0:
            c = r.session.alone(i)
        return c if c is not None and c.interval.n > 0 else None

    def transfer(self, i: int) -> Transfer:
        entries, states = [], []
        for k, r in enumerate(self.rungs):
            c = self.comparison(k, i)
            if c is None or r.evidence is None:
                continue
            item = r.evidence.item(c)
            assert isinstance(item, ComparisonEvidence)  # never an interaction
            entries.append(RungComparison(rung=r.rung.name, **dict(item)))
            states.append(_state(c))
        first, last = (entries[0], entries[-1]) if entries else (None, None)
        sign = sig = False
        if first is not None and last is not None and first is not last:
            a, b = first.utility[0], last.utility[0]
            sign = bool(a and b and (a > 0) != (b > 0))
            sig = _significant(first.utility) != _significant(last.utility)
        return Transfer(
            rungs=entries, sign_changed=sign, significance_changed=sig, pattern=_pattern(states)
        )

    def merge(self, decisions: list[Decision]) -> list[Decision]:
        """The first rung's decisions, replaced by the largest rung that compared each one."""
        out = []
        for i, d in enumerate(decisions):
            top = max((k for k, r in enumerate(self.rungs) if i in r.decisions), default=0)
            merged = self.rungs[top].decisions[i] if top else d
            merged = merged.model_copy(update={"rung": self.rungs[top].rung.name})
            if top:
                merged = self._reason(i, top, merged)
            out.append(merged.model_copy(update={"transfer": self.transfer(i)}))
        return out

    def _reason(self, i: int, top: int, d: Decision) -> Decision:
        """A verdict drawn at a larger rung says what the rung below it showed."""
        r = self.rungs[top]
        name = r.rung.name
        if i in r.same:
            key = self.rnd.spec.lr_tuning.key if self.rnd.spec.lr_tuning else "lr"
            value = r.session.lr["other"] if r.session.lr else math.nan
            reason = (
                f"only a learning-rate change: at rung {name} every recipe but the baseline "
                f"runs at the chosen recipe's best {key} ({value:g}), where it changes nothing"
            )
            return d.model_copy(update={"status": "shelved", "kind": "lr_only", "reason": reason})
        below = max((k for k in range(top) if self.comparison(k, i) is not None), default=None)
        if below is None:
            return d.model_copy(update={"reason": f"at rung {name}: {d.reason}"})
        c_low = self.comparison(below, i)
        c_top = r.conf.tested[i] if r.conf is not None else None
        assert c_low is not None and c_top is not None
        ev_low, ev_top = self.rungs[below].evidence, r.evidence
        assert ev_low is not None and ev_top is not None
        low_name = self.rungs[below].rung.name
        low_text = f"{_word(c_low)} at {low_name} ({ev_low.describe(c_low)})"
        top_text = f"{_word(c_top)} at {name} ({ev_top.describe(c_top)})"
        s_low, s_top = _state(c_low), _state(c_top)
        if s_low == "+" and d.status == "shelved" and s_top != "+":
            update = {"kind": "no_transfer", "reason": f"{low_text}, {top_text}: shelved"}
        elif s_low != "+" and d.status == "accepted":
            update = {"reason": f"{top_text}, {low_text}: accepted at the larger rung"}
        else:
            low = ev_low.describe(c_low)
            update = {"reason": f"at rung {name}: {d.reason}; at {low_name}: {low}"}
        return d.model_copy(update=update)

    # -- the recipe that ships, at the top rung measured

    def _top(self) -> RungOutcome:
        measured = [r for r in self.rungs if r.evidence is not None and r.conf is not None]
        return measured[-1]

    def predicted(self, selected: Subset) -> dict[str, Estimate]:
        """The selected recipe against the baseline at the largest rung that ran both (the
        top rung measured the recipe it confirmed, which may hold undecided members)."""
        for r in reversed(self.rungs):
            if r.evidence is None:
                continue
            out = r.evidence.predicted(selected)
            if any(v[0] is not None for v in out.values()):
                if r is not self._top():
                    self.notes.append(
                        f"predicted: the selected recipe against the baseline at rung "
                        f"{r.rung.name}, the largest rung that ran it"
                    )
                return out
        top = self._top()
        assert top.evidence is not None
        return top.evidence.predicted(selected)

    def guardrail_checks(self) -> list[GuardrailCheck]:
        top = self._top()
        assert top.evidence is not None
        return top.evidence.guardrail_checks()

    # -- round-level summary

    def summary(self) -> LadderRecord:
        ids = self.rnd.ids
        rungs = []
        for r in self.rungs:
            noise = math.nan
            if r.conf is not None:
                pool = [r.conf.final, *(r.conf.final - {i} for i in r.conf.final)]
                pool += [r.conf.final | {j} for j in r.close]
                seeds = [s for b in r.conf.blocks for s in b]
                noise = r.session._noise(pool, seeds, UTILITY)[0]
            rungs.append(
                RungRecord(
                    name=r.rung.name,
                    patch=r.rung.patch,
                    cost=r.cost,
                    cost_source=r.rung.cost_source,  # type: ignore[arg-type]
                    share=r.rung.share,
                    budget_units=r.units,
                    budget_runs=r.session.budget,
                    runs=r.runs,
                    units_used=r.spent,
                    noise_floor=finite([noise])[0],
                    chosen=[ids[i] for i in sorted(r.chosen)],
                    final=[ids[i] for i in sorted(r.kept)] if r.conf else [],
                    close_calls=[ids[i] for i in r.close],
                    out_of_budget=bool(r.conf.out_of_budget) if r.conf else True,
                    note=r.note,
                )
            )
        return LadderRecord(
            budget_units=self.rnd.spec.budget,
            units_used=sum(r.spent for r in self.rungs),
            rungs=rungs,
            agreement=[self.agreement(k) for k in range(1, len(self.rungs))],
            lr_tuning=self.lr_tuning,
        )

    def agreement(self, k: int) -> Agreement:
        """Rung k-1 against rung k: Kendall's tau between the mean utilities of the recipes
        measured at both (bootstrap over each rung's seeds), and how many of the lower rung's
        decided verdicts the upper one confirmed."""
        low, up = self.rungs[k - 1], self.rungs[k]
        common = sorted(_subsets(low.session) & _subsets(up.session), key=sorted)
        series_low = [low.session.series(s, _seeds(low.session), UTILITY) for s in common]
        series_up = [up.session.series(s, _seeds(up.session), UTILITY) for s in common]
        keep = [j for j in range(len(common)) if series_low[j] and series_up[j]]
        # Each rung's means on the seeds every kept recipe ran: seed effects are large
        # (often larger than the effects), so means over different seeds would rank seeds.
        series_low = _on_shared_seeds([series_low[j] for j in keep])
        series_up = _on_shared_seeds([series_up[j] for j in keep])
        tau = _tau_interval(series_low, series_up) if series_low and series_up else None
        compared = confirmed = 0
        for i in range(self.rnd.ids.__len__()):
            a, b = self.comparison(k - 1, i), self.comparison(k, i)
            if a is None or b is None or "open" in (a.verdict, b.verdict):
                continue
            compared += 1
            confirmed += (a.verdict == "accept") == (b.verdict == "accept")
        return Agreement(
            from_=low.rung.name,
            to=up.rung.name,
            subsets=len(keep),
            kendall_tau=tau,
            verdicts_compared=compared,
            verdicts_confirmed=confirmed,
        )


def run_ladder(first_factory: Any, rnd: Round, say: Any) -> RoundResult:
    """Run every rung of `rnd`'s ladder and return the round's result.

    `first_factory(rung, budget, first_batch, avoid_seeds)` makes a session (engine.py)
    sharing the store, runner and executor.
    """
    rungs = rnd.rungs
    budget = rnd.spec.budget
    cost0 = rungs[0].cost
    assert cost0 is not None
    plan = budget_plan(rnd)
    say(f"[bold]scale ladder[/]: budget {budget} cost units")
    for k, (r, units) in enumerate(zip(rungs, plan, strict=True)):
        what = (
            "screening, search, confirmation"
            if k == 0
            else ("the recipe chosen below, its leave-one-outs and close calls")
        )
        if r.cost is not None:
            runs = int(units // r.cost)
            price = f"cost {r.cost:g} ({r.cost_source}), {units:g} units = {runs} runs"
        else:
            price = f"cost measured from its first runs, {units:g} units"
        more = " (+ what lower rungs leave)" if k else ""
        say(f"  rung {r.name} {r.patch}: {price}: {what}{more}")

    units0 = plan[0]
    s0 = first_factory(rungs[0], int(units0 // cost0), 0, ())
    found = s0.search()
    ev0 = s0.evidence(found.views, found.conf)
    outcome0 = RungOutcome(rungs[0], s0, cost0, units0, found.chosen, [], found.conf, ev0)
    outcome0.decisions = {i: ev0.decide(i) for i in range(s0.n)}
    outcomes = [outcome0]
    ladder = LadderOutcome(s0, found, outcomes)
    latest = dict(outcome0.decisions)  # contribution -> its decision at the largest rung so far
    carried = outcome0.kept
    for k in range(1, len(rungs)):
        below = outcomes[-1]
        units = plan[k] + max(0.0, below.units - below.spent)
        close, later = close_calls(below, latest, carried)
        batch = sum(len(r.session.batches) for r in outcomes)
        avoid = {p.seed for r in outcomes for p in r.session.points.values()}
        avoid |= {s for r in outcomes if r.conf for b in r.conf.blocks for s in b}
        session = first_factory(rungs[k], 10**9, batch, avoid)  # budget set once priced
        session.adopt(s0)
        out = RungOutcome(rungs[k], session, rungs[k].cost or math.nan, units, carried, close)
        outcomes.append(out)
        if not carried and not close:
            out.note = "nothing to measure: the rung below chose nothing and left no close call"
            session.budget = 0
            ladder.notes.append(f"rung {rungs[k].name}: {out.note}")
            continue
        top = k == len(rungs) - 1
        if top and rnd.spec.lr_tuning is not None:
            ladder.lr_tuning = _tune_lr(session, carried)
        if rungs[k].cost is None:
            out.cost = _measure_cost(session, s0, cost0)
            say(f"  rung {rungs[k].name}: one run costs {out.cost:.3g} units (measured)")
        session.budget = int(units // out.cost)
        out.same = _same_here(session, carried)
        chosen = carried - set(out.same)
        close = [j for j in close if not _identical(session, chosen | {j}, chosen)]
        later = [j for j in later if not _identical(session, chosen | {j}, chosen)]
        out.close = close
        say(
            f"[bold]rung {rungs[k].name}[/]: {session.names(chosen)} and its leave-one-outs"
            + (f", close calls {', '.join(rnd.blind[rnd.ids[j]] for j in close)}" if close else "")
            + f"; {session.budget} runs ({units:g} units)"
        )
        if session.used >= session.budget:
            out.note = "the budget left at this rung pays for no comparison"
            ladder.notes.append(f"rung {rungs[k].name}: {out.note}")
            continue
        out.conf = session.confirm_upper(chosen, close, later)
        out.evidence = session.evidence(found.views, out.conf)
        out.decisions = {i: out.evidence.decide(i) for i in out.conf.tested}
        out.decisions |= {i: latest[i] for i in out.same}
        for i in out.decisions:
            latest[i] = out.decisions[i]
        carried = out.kept
        ladder.notes += [f"rung {rungs[k].name}: {n}" for n in session.notes]
        session.notes = []
    ladder.notes.append(
        f"credit is drawn from the effects model of rung {rungs[0].name}, the only rung that "
        "measures enough recipes to fit one; the verdicts come from the largest rung measured"
    )
    return s0._result(found, ladder)


def budget_plan(rnd: Round) -> list[float]:
    """Cost units per rung before leftovers. The first rung gets its share, and at least
    what its screening and the smallest confirmation need when its share was not given (the
    rest of the round cannot decide anything without them); the larger rungs split the rest
    in proportion to their shares."""
    rungs, budget = rnd.rungs, float(rnd.spec.budget)
    cost0 = rungs[0].cost
    assert cost0 is not None
    first = rungs[0].share * budget
    if rungs[0].share_source == "default" and len(rungs) > 1:
        screen = len(screening_design(len(rnd.contributions), rnd.groups))
        need = (screen * len(rnd.seeds) + 3 * rnd.confirm_count) * cost0
        first = max(first, min(need, budget))
    upper = sum(r.share for r in rungs[1:])
    rest = budget - first
    return [first, *(rest * r.share / upper if upper > 0 else 0.0 for r in rungs[1:])]


def close_calls(
    below: RungOutcome, decisions: dict[int, Decision], final: Subset
) -> tuple[list[int], list[int]]:
    """What the next rung adds to the recipe: (close calls, later).

    Close calls: contributions the rung below left out without ruling out a gain of
    min_effect (undecided, or the upper end of their latest interval at or above it),
    measured first. Later: the rest of those it shelved without showing them to hurt, when
    the budget allows (a gain only the larger model shows is "no gain" at the smaller one,
    however many seeds measured it). Neither holds a member of the recipe, a rival of one,
    or a contribution that failed, broke a guardrail or conflicts. Best estimate first.
    """
    s = below.session
    close: list[tuple[float, int]] = []
    later: list[tuple[float, int]] = []
    for j in range(s.n):
        d = decisions[j]
        if j in final or s._grouped_with(j, final):
            continue
        if d.kind in ("failed", "guardrail", "conflict", "lr_only"):
            continue
        evidence = [e for e in d.evidence if isinstance(e, ComparisonEvidence)]
        if not evidence:
            continue
        est, _, high = evidence[0].utility
        if high is not None and high < 0:  # shown to hurt
            continue
        rank = (-(est if est is not None else 0.0), j)
        if d.status == "undecided" or high is None or high >= s.min_effect:
            close.append(rank)
        else:
            later.append(rank)
    return [j for _, j in sorted(close)], [j for _, j in sorted(later)]


def _tune_lr(session: _Session, chosen: Subset) -> LrTuning:
    """The baseline and the chosen recipe over the grid on seeds of their own; each one's
    best value (highest mean utility; a tie goes to the factor nearest 1)."""
    rnd = session.rnd
    spec = rnd.spec.lr_tuning
    assert spec is not None
    base_value = float(get_dotted(session.resolve(frozenset()).data, spec.key))
    values = [base_value * f for f in spec.factors]
    seeds = fresh_seeds(session._used_seeds(), spec.seeds)
    recipes = [frozenset(), chosen] if chosen else [frozenset()]
    for v in values:
        session.run_batch("lr-grid", recipes, seeds, lr=v)
    means: dict[Subset, list[tuple[float, float]]] = {}
    for subset in recipes:
        for v in values:
            ys = [
                session.value(key, UTILITY)
                for s in seeds
                if session._done(key := run_key(session.resolve(subset, v).run_hash, s))
            ]
            means.setdefault(subset, []).append((v, float(np.mean(ys)) if ys else -math.inf))

    def best(rows: list[tuple[float, float]]) -> float:
        order = sorted(
            zip(rows, spec.factors, strict=True),
            key=lambda x: (-x[0][1], abs(math.log(x[1])), x[1]),
        )
        return order[0][0][0]

    base_best = best(means[frozenset()])
    other_best = best(means[chosen]) if chosen else base_best
    session.lr = {"base": base_best, "other": other_best}
    session.say(
        f"  learning rate at rung {session.rung.name if session.rung else ''}: baseline best "
        f"{spec.key}={base_best:g}, chosen recipe best {other_best:g} "
        f"({len(seeds)} seeds of their own)"
    )
    ids = rnd.ids
    return LrTuning(
        key=spec.key,
        rung=session.rung.name if session.rung else None,
        values=values,
        seeds=seeds,
        recipe=[ids[i] for i in sorted(chosen)],
        baseline=LrCurve(
            best=base_best, utility=[(v, finite([m])[0]) for v, m in means[frozenset()]]
        ),
        final=LrCurve(
            best=other_best, utility=[(v, finite([m])[0]) for v, m in means.get(chosen, [])]
        ),
    )


def _measure_cost(session: _Session, first: _Session, cost0: float) -> float:
    """A rung's cost per run: the median duration of its finished runs (the first block of
    the baseline, run now if none is) over the first rung's screening runs, times the
    first rung's cost."""
    if not any(session._done(k) for k in session.points):
        block = fresh_seeds(session._used_seeds(), session.rnd.confirm_count)
        session.first_block = block
        session.run_batch("probe", [frozenset()], block)
    mine = _durations(session, list(session.points))
    base = _durations(first, [p.key for p in first.points.values() if p.batch == 0])
    if not mine or not base or statistics.median(base) <= 0:
        session.notes.append("run times unknown: the rung's cost is taken as the first rung's")
        return cost0
    return float(f"{cost0 * statistics.median(mine) / statistics.median(base):.3g}")


def _durations(session: _Session, keys: Sequence[str]) -> list[float]:
    """The trainers' own run times (not claim to finish: a claimed run may wait its turn)."""
    out = []
    for key in keys:
        run = session.store.get(key)
        if run is not None and run.status == "done" and run.seconds is not None:
            out.append(run.seconds)
    return out


def _identical(session: _Session, a: Subset, b: Subset) -> bool:
    return session.resolve(a).run_hash == session.resolve(b).run_hash


def _same_here(session: _Session, chosen: Subset) -> list[int]:
    """Members whose change is overwritten at this rung (only a learning-rate change, with
    lr_tuning): the recipe without them is the same run."""
    if session.lr is None:
        return []
    return [i for i in sorted(chosen) if _identical(session, chosen, chosen - {i})]


def _subsets(session: _Session) -> set[Subset]:
    return {p.subset for p in session.points.values() if p.lr is None}


def _seeds(session: _Session) -> list[int]:
    return sorted({p.seed for p in session.points.values() if p.lr is None})


def _on_shared_seeds(series: Sequence[dict[int, float]]) -> list[dict[int, float]]:
    """The series cut to the seeds all of them have; [] when they share none."""
    if not series:
        return []
    shared = set.intersection(*(set(s) for s in series))
    if not shared:
        return []
    return [{x: s[x] for x in sorted(shared)} for s in series]


def _tau_interval(
    low: Sequence[dict[int, float]], up: Sequence[dict[int, float]]
) -> list[float | None] | None:
    """Kendall's tau between the two rungs' mean utilities, with a percentile bootstrap
    interval over each rung's seeds (resampled independently; every recipe of a rung on the
    same draw, so seed effects cancel). None below 3 recipes."""
    if len(low) < 3:
        return None

    def means(series: Sequence[dict[int, float]], seeds: Sequence[int]) -> list[float]:
        out = []
        for s in series:
            ys = [s[x] for x in seeds if x in s]
            out.append(float(np.mean(ys)) if ys else float(np.mean(list(s.values()))))
        return out

    seeds_low = sorted({x for s in low for x in s})
    seeds_up = sorted({x for s in up for x in s})
    est = stats.kendalltau(means(low, seeds_low), means(up, seeds_up)).statistic
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(AGREEMENT_DRAWS):
        a = list(rng.choice(seeds_low, len(seeds_low)))
        b = list(rng.choice(seeds_up, len(seeds_up)))
        tau = stats.kendalltau(means(low, a), means(up, b)).statistic
        if math.isfinite(tau):
            draws.append(tau)
    if not math.isfinite(est):
        return None
    if not draws:
        return finite([est, math.nan, math.nan])
    q = (1 - AGREEMENT_LEVEL) / 2
    return finite([float(est), float(np.quantile(draws, q)), float(np.quantile(draws, 1 - q))])


def _state(c: Comparison) -> str:
    return {"accept": "+", "harm": "-", "open": "?"}.get(c.verdict, "0")


def _significant(utility: Estimate) -> bool:
    _, low, high = utility
    return (low is not None and low > 0) or (high is not None and high < 0)


def _pattern(states: Sequence[str]) -> Pattern:
    """holds (same verdict at the first and the last rung measured), flips (helps at one,
    hurts at the other), fades (helps, then no gain shown), emerges (helps only at the
    larger), changes (no gain and hurts, either way), undecided (either end left open: no
    claim about transfer), one rung."""
    if len(states) < 2:
        return "one rung"
    a, b = states[0], states[-1]
    if "?" in (a, b):
        return "undecided"
    if a == b:
        return "holds"
    if {a, b} == {"+", "-"}:
        return "flips"
    if a == "+":
        return "fades"
    if b == "+":
        return "emerges"
    return "changes"


def _word(c: Comparison) -> str:
    return {
        "accept": "helps",
        "harm": "hurts",
        "small": "too small",
        "none": "no gain shown",
        "open": "undecided",
    }[c.verdict]
