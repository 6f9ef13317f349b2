"""The integration engine: screen -> search -> confirm -> decide -> credit -> report.

`integrate(round_file, out_dir)` runs one round to its decision. Why it is built this way:

* **The store is the memory.** Every run goes through the run store, content-addressed by
  recipe hash and seed, so a run is trained once whichever batch or round asks for it.
  The plan is a deterministic function of the finished runs (fits use fixed bootstrap
  seeds, and only the runs of the design so far), so killing the engine at any moment and
  starting it again replays the same plan, finds the finished runs in the store, runs what
  is missing and reaches the same decision.
* **The model searches, direct comparisons decide.** The effects model (effects.py), fitted
  on every run, proposes which recipes to run and which subset to try; it assumes every
  interaction it has not measured is zero, so its intervals can miss by far, and no verdict
  rests on them. A verdict rests on direct, seed-paired comparisons (verdicts.py): a member
  is accepted only when leaving it out of the final recipe costs a significant gain of at
  least `min_effect`, measured on confirmation seeds that took no part in choosing.
* **The confirmation is paid for up front.** When screening ends, a share of the remaining
  budget is set aside, so the search can never spend it. The confirmation is sequential:
  after each block of seeds, only the comparisons still undecided get more seeds, up to a
  planned number of looks, with the error spent across the looks (valid however early a
  comparison stops). A comparison the budget could not settle is reported as undecided,
  with about how many runs would settle it, never as "no gain".
* **The final recipe changes one step at a time.** When the confirmation shelves members,
  or a left-out contribution turns out to help inside the final recipe, the recipe changes
  and its leave-one-outs are measured again on the same confirmation seeds. A member is
  only shelved on a decided verdict (shown to hurt, shown too small, or no gain at the last
  look), never because a few seeds were not enough: that is what kept the old one-test-per-
  member rule from demoting real gains one after another.
* **Guardrails belong to the final recipe.** A guardrail is judged on the recipe that would
  ship against the baseline (its members together, interactions included). A contribution
  alone is shelved for a guardrail only when the breach is shown; when the runs can neither
  show a breach nor rule one out, the report says so and names the drop they can rule out.
* **Blind until decided.** While the round runs, the store and the terminal know
  contributions only by blind ids; real ids appear in the outputs written after the
  decisions, and authors only in the credit table.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from stacklab.errors import StacklabError
from stacklab.integrate.credit import Credit
from stacklab.integrate.decide import (
    SCREEN_LEVEL,
    Attempt,
    Comparison,
    Confirmation,
    Evidence,
    GuardCheck,
)
from stacklab.integrate.effects import EffectsFit, fit_effects, interaction_contrast
from stacklab.integrate.ladder import LadderOutcome, run_ladder
from stacklab.integrate.lock import hold_round_folder
from stacklab.integrate.planner import Proposal, Subset, fresh_seeds, propose, screening_design
from stacklab.integrate.provenance import stale_reason
from stacklab.integrate.record import (
    BatchRecord,
    CodeSummary,
    ConfirmationRecord,
    DecisionRecord,
    GuardrailRecord,
    GuardState,
    ObjectiveRecord,
    Power,
    RunCounts,
    finite,
)
from stacklab.integrate.report import write_reports
from stacklab.integrate.round import Round, RoundError, Rung, load_round
from stacklab.integrate.runners import (
    CommandRunner,
    Executor,
    Job,
    Outcome,
    make_executor,
    make_runner,
    remove_partial_runs,
)
from stacklab.integrate.select import (
    Choice,
    Objective,
    search_candidates,
)
from stacklab.integrate.store import Run, RunStore, StoreError, run_key
from stacklab.integrate.utility import UTILITY, UtilityDraws, utility
from stacklab.integrate.verdicts import (
    MAX_PLAN_LOOKS,
    POWER_TARGET,
    Interval,
    SequentialPlan,
    Verdict,
    detectable_gain,
    guard_margins,
    paired_interval,
    pooled_noise,
    verdict,
)
from stacklab.integrate.workspace import Resolved
from stacklab.progress import progress_bar
from stacklab.tracking import RoundTracker

MAX_BATCHES = 50  # adaptive batches; the budget normally stops a round long before
MAX_ATTEMPTS = 6  # rounds of comparisons (each change of the final recipe starts one)
CONFIRM_SHARE = 0.8  # of the budget left after screening, held back for the confirmation
MIN_EFFECT_NOISE = 0.5  # default min_effect, in units of one run's utility noise
PRUNE_PROB = 0.8  # model's P(gain > 0) a member needs to be confirmed without a gain alone


@dataclass(frozen=True)
class DesignRun:
    """A run of the design: which subset, which seed, in which batch it was first planned
    (and, in a scale ladder, at which rung and learning rate)."""

    key: str
    subset: Subset
    seed: int
    batch: int
    rung: str | None = None
    lr: float | None = None


@dataclass(frozen=True)
class RunBatch:
    """One batch of the plan: recipes x seeds, with why the adaptive ones were proposed."""

    number: int
    purpose: str  # screening | adaptive | confirmation | interaction
    subsets: list[Subset]
    seeds: list[int]
    why: dict[Subset, str]
    rung: str | None = None
    lr: float | None = None


@dataclass(frozen=True)
class Views:
    """Fits of the same round on different runs: `full` (every run: search, credit, the
    interaction picture) and `screen` (the screening seeds, where every contribution ran alone
    on every seed: the effects picture). Neither decides a verdict."""

    full: dict[str, EffectsFit]
    screen: dict[str, EffectsFit]


@dataclass(frozen=True)
class Searched:
    """What a session's screening, search and confirmation found, before the reports."""

    views: Views
    choice: Choice
    chosen: Subset  # the model's choice sent to the confirmation
    conf: Confirmation
    stopped: str  # why the search stopped: confident | budget | batch limit


@dataclass
class RoundResult:
    """Everything the reports show; `decision` is the decision record (decision.json)."""

    decision: DecisionRecord
    round: Round
    views: Views
    choice: Choice
    final: Subset
    batches: list[RunBatch]
    points: list[DesignRun]
    runs: dict[str, Run]
    credit: dict[str, dict[int, Credit]]  # metric or "utility" -> contribution -> credit
    discoveries: dict[tuple[int, str], bool]  # (contribution, metric) -> gain alone shown


def integrate(
    round_file: str | Path, out_dir: str | Path, console: Console | None = None
) -> RoundResult:
    """Run a round to its decision; write decision.json, report.md and report.html in out_dir."""
    out = Path(out_dir).absolute()  # runs execute in the round file's folder (or their tree)
    rnd = load_round(round_file, out)
    out.mkdir(parents=True, exist_ok=True)
    # The folder's own SQLite store is this engine's alone: a second engine on the folder is
    # refused at once. A store the round names may be shared: engines cooperate through it.
    shared = rnd.spec.store is not None
    with hold_round_folder(out, shared):
        url = rnd.spec.store or f"sqlite:///{(out / 'runs.db').resolve()}"
        runner = make_runner(rnd.spec.runner, rnd.file.parent, rnd.metrics, rnd.workers)
        executor = make_executor(rnd.spec.executor, rnd.workers)
        console = console or Console(stderr=True)
        # Alone on its store, the engine hands back every run left running (by a killed
        # engine); sharing it, only the runs of engines that are gone (see store.py).
        with RunStore(url, reset_stale=not shared) as store:
            store.reset_dead()
            runner = replace(runner, owner=store.owner)
            remove_partial_runs(out / "runs", store.live_owners if shared else frozenset)
            if not shared:  # half-exported trees of a killed engine (a git round)
                for tmp in (out / "trees").glob(".*.tmp-*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            if rnd.rungs:  # a scale ladder: one session per rung (ladder.py)

                def session(
                    rung: Rung, budget: int, first_batch: int, avoid: Iterable[int]
                ) -> _Session:
                    assert console is not None
                    return _Session(
                        rnd, out, store, runner, executor, console, rung, budget, first_batch,
                        avoid,
                    )  # fmt: skip

                result = run_ladder(session, rnd, lambda text: console.print(text, highlight=False))
            else:
                result = _Session(rnd, out, store, runner, executor, console).run()
        write_reports(result, out)
    console.print(
        f"[bold]decision[/] in {escape(str(out / 'decision.json'))}; "
        f"report: {escape(str(out / 'report.html'))}",
        highlight=False,
    )
    return result


class _Session:
    """One invocation of a round: the design so far, and the runs it asks the store for."""

    def __init__(
        self,
        rnd: Round,
        out: Path,
        store: RunStore,
        runner: CommandRunner,
        executor: Executor,
        console: Console,
        rung: Rung | None = None,
        budget: int | None = None,
        first_batch: int = 0,
        avoid_seeds: Iterable[int] = (),
    ):
        self.rnd, self.out, self.store = rnd, out, store
        self.runner, self.executor, self.console = runner, executor, console
        self.n = len(rnd.contributions)
        # A rung of a scale ladder (ladder.py): its patch goes on top of every subset, its
        # share of the budget is this session's, and its seeds avoid the lower rungs'.
        self.rung = rung
        self.budget = rnd.spec.budget if budget is None else budget
        self.first_batch = first_batch
        self.avoid_seeds = set(avoid_seeds)
        self.lr: dict[str, float] | None = None  # lr_tuning at this rung: "base" and "other"
        # A larger rung (ladder.py): the first rung's session (its screening stands in for
        # "alone" evidence), the close calls to add to the recipe, and the first block's seeds.
        self.first: _Session | None = None
        self.close: list[int] | None = None
        self.later: list[int] = []  # measured added to the recipe if the budget allows
        self.first_block: list[int] | None = None
        self.points: dict[str, DesignRun] = {}
        self.batches: list[RunBatch] = []
        self._resolved: dict[str, Resolved] = {}  # run key -> its config and code
        # This round's finished runs from earlier invocations, by (blind subset, seed, rung,
        # lr): a request under a new key for one of them sets it aside as stale (other code).
        self._earlier: dict[tuple[Any, ...], list[Run]] = {}
        for run in store.runs(round=rnd.name, status="done"):
            self._earlier.setdefault(_earlier_key(run.subset, run.seed, run.provenance), []).append(
                run
            )
        self.stale: dict[str, str] = {}  # run key -> why it no longer counts
        self._metrics: dict[str, dict[str, float] | None] = {}  # finished runs' metrics
        self.notes: list[str] = []
        self.objectives: list[Objective] = list(rnd.objectives)  # scales fixed after screening
        self.min_effect = math.nan
        self.noise_floor: dict[str, float] = {}
        self.alpha = 1.0 - rnd.spec.level
        self.reserve = 0  # runs held back for the confirmation, fixed when screening ends
        self.tracker: RoundTracker | None = None  # each finished run also to trackers
        if (track := rnd.spec.tracking) is not None:
            folder = rnd.file.parent / track.dir if track.dir else out / "tracking"
            self.tracker = RoundTracker(track.trackers, folder, track.project, rnd.name)

    # ------------------------------------------------------------------ the round

    def run(self) -> RoundResult:
        return self._result(self.search())

    def search(self) -> Searched:
        """Screening, search and confirmation: everything but the reports."""
        rnd = self.rnd
        screen = screening_design(self.n, rnd.groups)
        need = len(screen) * len(rnd.seeds) + 3 * rnd.confirm_count
        if self.budget < need:
            what = f"budget {self.budget}"
            if self.rung is not None:
                what = f"rung {self.rung.name}'s share of the budget ({self.budget} runs)"
            raise RoundError(
                f"{rnd.file}: {what} is below what screening "
                f"({len(screen)} recipes x {len(rnd.seeds)} seeds) and the smallest look of "
                f"the confirmation (3 recipes x {rnd.confirm_count} seeds) need: {need}"
            )
        self.say(
            f"[bold]round {rnd.name}[/]: {self.n} contributions "
            f"({', '.join(rnd.blind[c] for c in rnd.ids)}), budget {self.budget} runs{self.at}"
        )
        self.run_batch("screening", screen, rnd.seeds)
        self._calibrate()
        reserve = max(3 * rnd.confirm_count, round(CONFIRM_SHARE * (self.budget - self.used)))
        self.reserve = reserve
        self.say(f"  {reserve} runs held back for the confirmation")

        stopped = "confident"
        fits = self.fit()
        while True:
            proposal = self._propose(fits)
            if not proposal.subsets:
                break
            seeds = fresh_seeds(self._used_seeds(), len(rnd.seeds))
            subsets = [frozenset(), *proposal.subsets]
            while (
                len(subsets) > 1 and self.used + self.cost(subsets, seeds) + reserve > self.budget
            ):
                subsets.pop()
            if len(subsets) == 1 or len(self.batches) >= MAX_BATCHES:
                stopped = "budget" if len(subsets) == 1 else "batch limit"
                break
            self.run_batch("adaptive", subsets, seeds, proposal.why)
            fits = self.fit()
        chosen = self._prune(fits, proposal.chosen)
        self.say(f"  choice to confirm: {self.names(chosen)}")
        conf = self._confirm(chosen, fits)
        self._measure_culprits(conf, fits)
        fits = self.fit()
        choice = self._propose(fits).table
        screen_fit = self.fit(set(rnd.seeds))
        views = Views(full=fits, screen=screen_fit)
        if self.stale:
            counts = _count_reasons(self.stale)
            self.say(
                f"{len(self.stale)} stored runs of this round set aside as stale: "
                + "; ".join(f"{n} because {why}" for why, n in counts.items())
            )
        return Searched(views, choice, chosen, conf, stopped)

    def _calibrate(self) -> None:
        """Fix the utility's units, the noise floor and min_effect from the screening runs."""
        rnd = self.rnd
        screen = [p for p in self.points.values() if self._done(p.key)]
        for name in rnd.metrics:
            obs = [(p.subset, p.seed, self.value(p.key, name)) for p in screen]
            self.noise_floor[name] = pooled_noise(obs)[0]

        def unit(o: Objective) -> float:  # its own scale, else one run's noise, else 1
            if o.scale is not None:
                return o.scale
            sd = self.noise_floor[o.name]
            return sd if math.isfinite(sd) and sd > 0 else 1.0

        self.objectives = [replace(o, scale=unit(o)) for o in rnd.objectives]
        obs = [(p.subset, p.seed, self.value(p.key, UTILITY)) for p in screen]
        self.noise_floor[UTILITY] = pooled_noise(obs)[0]
        u_sd = self.noise_floor[UTILITY]
        if rnd.spec.min_effect is not None:
            self.min_effect = rnd.spec.min_effect
        else:
            self.min_effect = MIN_EFFECT_NOISE * u_sd if math.isfinite(u_sd) else 0.0
        floor = ", ".join(f"{m} {sd:.3g}" for m, sd in self.noise_floor.items())
        self.say(f"  noise floor (one run, after the seed effect): {floor}")
        plan = self._plan(len([i for i in range(self.n) if i not in self._grouped()]) // 2 + 1)
        gain = detectable_gain(u_sd, math.inf, plan.max_seeds, plan.alpha_at(plan.looks))
        self.power = {"max_seeds": plan.max_seeds, "detectable_gain": gain}
        self.say(
            f"  with this noise and budget a gain inside the final recipe above {gain:.3g} "
            f"utility is detected with 80% power ({plan.max_seeds} confirmation seeds); "
            f"min_effect {self.min_effect:.3g}"
        )
        if math.isfinite(gain) and self.min_effect < gain:
            self.notes.append(
                f"min_effect {self.min_effect:.3g} is below the gain this budget resolves with "
                f"80% power ({gain:.3g} utility): real gains between the two may be shelved "
                "as not shown or left undecided; a larger budget resolves smaller gains"
            )
        if rnd.spec.margin < gain and math.isfinite(gain):
            self.notes.append(
                f"margin {rnd.spec.margin:g} is below the resolvable gain ({gain:.3g}): the "
                "search may stop before telling such close candidates apart"
            )

    def _grouped(self) -> set[int]:
        return {i for g in self.rnd.groups for i in g}

    def _plan(self, comparisons: int) -> SequentialPlan:
        """Looks the budget left can pay for, with `comparisons` open at the first look."""
        block = self.rnd.confirm_count
        left = self.budget - self.used
        first = block * (2 + comparisons)
        later = block * (1 + max(1, math.ceil(comparisons / 2)))
        looks = 1 + max(0, left - first) // later
        return SequentialPlan(self.alpha, int(min(MAX_PLAN_LOOKS, max(1, looks))), block)

    def _propose(self, fits: dict[str, EffectsFit]) -> Proposal:
        spec = self.rnd.spec
        candidates = search_candidates(
            fits, self.objectives, self.rnd.guardrails, self.n, self.rnd.groups,
            must_include=self.measured(), prob=spec.guardrail_prob,
        )  # fmt: skip
        return propose(
            fits, self.objectives, self.rnd.guardrails, candidates, self.measured(),
            {p.subset for p in self.points.values()}, spec.confidence, spec.guardrail_prob,
            spec.margin,
        )  # fmt: skip

    def _prune(self, fits: dict[str, EffectsFit], chosen: Subset) -> Subset:
        """Drop, weakest first, members with no reason yet to be confirmed.

        A member goes to the confirmation when the model says it adds at least min_effect
        inside the choice and, unless its gain alone is shown, the model's draws put that
        gain above zero with probability PRUNE_PROB (a null that noise pushed into the choice
        has neither), or when another member's gain leans on it (a synergy pair does nothing
        alone, and dropping one partner drops the other's gain). The model only guides here:
        a member it keeps still has to prove itself on confirmation seeds, and one it drops is
        judged on its own runs (alone, or added back to the final recipe when its gain alone
        shows).
        """
        util = UtilityDraws(fits, self.objectives)
        current = set(chosen)
        while current:
            fset = frozenset(current)
            gains = {i: util.diff(fset, fset - {i}) for i in sorted(fset)}

            def partner(i: int, fset: Subset = fset) -> bool:
                """Does another member lose min_effect of its gain without i (a synergy)?"""
                rest = fset - {i}
                return any(
                    util.diff(fset, fset - {k})[0] - util.diff(rest, rest - {k})[0]
                    >= self.min_effect
                    for k in rest
                )

            candidates = [i for i in sorted(fset) if self._weak(i, *gains[i]) and not partner(i)]
            if not candidates:
                break
            weakest = min(candidates, key=lambda i: (gains[i][0], i))
            current.discard(weakest)
            self.say(
                f"  model: {self.rnd.blind[self.rnd.ids[weakest]]} adds "
                f"{gains[weakest][0]:+.3g} inside, not clearly a gain: not confirmed as a member"
            )
        return frozenset(current)

    def _weak(self, i: int, est: float, draws: np.ndarray) -> bool:
        if est < self.min_effect:
            return True
        alone = self.alone(i)
        shown = alone is not None and alone.verdict == "accept"
        return not shown and float(np.mean(draws > 0.0)) < PRUNE_PROB

    # ------------------------------------------------------------------ confirmation

    def adopt(self, first: _Session) -> None:
        """A larger rung judges in the first rung's units: the same objective scales,
        min_effect and level; its noise floor stands in for planning until this rung's own
        runs give one."""
        self.first = first
        self.objectives = list(first.objectives)
        self.min_effect = first.min_effect
        self.noise_floor = dict(first.noise_floor)
        self.power = dict(first.power)

    def confirm_upper(
        self, chosen: Subset, close: Sequence[int], later: Sequence[int] = ()
    ) -> Confirmation:
        """A larger rung: the recipe the rung below chose against the baseline, each member's
        leave-one-out and each close call added, in sequential looks as at the first rung;
        then, with runs left, `later` added one at a time (see _second_tier)."""
        assert self.first is not None
        self.close, self.later = list(close), list(later)
        return self._confirm(chosen, {})

    def _grouped_with(self, j: int, final: Subset) -> bool:
        return any(j in g and final.intersection(g) for g in self.rnd.groups)

    def helps_alone(self, j: int) -> bool:
        """Is j's gain alone shown (on the first rung's screening seeds)?"""
        if self.first is not None:
            return self.first.helps_alone(j)
        alone = self.alone(j)
        return alone is not None and alone.verdict == "accept"

    def _suspects(self, final: Subset) -> list[int]:
        """Left-out contributions whose gain alone is shown (and no guardrail breach alone):
        the confirmation measures them added to the final recipe. At a larger rung: the close
        calls of the rung below."""
        if self.close is not None:
            return [j for j in self.close if j not in final and not self._grouped_with(j, final)]
        out = []
        for j in range(self.n):
            if j in final or any(j in g and final.intersection(g) for g in self.rnd.groups):
                continue
            alone = self.alone(j)
            if alone is None or alone.verdict != "accept":
                continue
            if any(
                c.state == "breached" for c in self.guard_checks(frozenset({j}), self.rnd.seeds)
            ):
                continue
            out.append(j)
        return out

    def _confirm(self, chosen: Subset, fits: dict[str, EffectsFit]) -> Confirmation:
        """Sequential leave-one-out (and add-one) comparisons around the final recipe."""
        final = chosen
        conf = Confirmation(final=final, plan=self._plan(len(chosen) + len(self._suspects(chosen))))
        plan = conf.plan
        u_sd = self.noise_floor[UTILITY]
        gain = detectable_gain(u_sd, math.inf, plan.max_seeds, plan.alpha_at(plan.looks))
        conf.powered = math.isfinite(gain) and gain <= POWER_TARGET * u_sd
        self.say(
            f"  confirmation plan: up to {plan.looks} looks of {plan.block} seeds, "
            f"alpha {plan.alpha:g} spent over the looks; gains above {gain:.3g} detected "
            "with 80% power"
        )
        if not conf.powered:
            self.notes.append(
                f"the budget left pays for {plan.max_seeds} confirmation seeds, which find only "
                f"gains above {gain:.3g} utility with 80% power ({gain / u_sd:.2g} noise sds): "
                "a comparison not clear by then is left undecided rather than shelved"
            )
        seen: set[Subset] = {final}
        measured: set[int] = set()  # members and add-ones measured around this final recipe
        for attempt in range(MAX_ATTEMPTS):
            members = [i for i in sorted(final) if i not in measured]
            suspects = [j for j in self._suspects(final) if j not in measured]
            swaps: list[int] = []
            if not members and not suspects:
                suspects, swaps = self._second_tier(conf, final, measured)
                if not suspects and not swaps:
                    break
            comps = self._run_looks(conf, final, members, suspects, attempt, swaps)
            if not comps:  # not even one look could be paid for
                break
            measured |= set(comps)
            conf.history.setdefault(final, {}).update(comps)
            for c in comps.values():
                conf.tested[c.member] = c
            conf.attempts.append(
                Attempt(
                    recipe=sorted(final),
                    comparisons={c.member: c.verdict for c in comps.values()},
                    guardrails={g.guardrail.metric: g.state for g in conf.guards},
                )
            )
            change = self._next_recipe(final, comps, conf, fits)
            if change is None:
                if conf.out_of_budget:
                    break
                continue
            if change in seen:  # back to a recipe measured before: its evidence stands
                final = change
                conf.tested.update(conf.history.get(final, {}))
                break
            seen.add(change)
            first = [frozenset(), change, *(change - {i} for i in change)]
            first += [change | {j} for j in self._suspects(change)]
            if self.used + self.cost(first, self._block(conf, 1)) > self.budget:
                conf.out_of_budget = True
                self.notes.append(
                    f"the final recipe became {self.names(change, blind=False)} with no budget "
                    "left to measure its members again: their gains were measured in "
                    f"{self.names(final, blind=False)}"
                )
                final = change
                break
            final, measured = change, set()
            self.say(f"  final recipe now: {self.names(final)}; measuring its members again")
        else:
            self.notes.append(
                f"the confirmation stopped after {MAX_ATTEMPTS} rounds of comparisons"
            )
        conf.final = final
        return conf

    def _block(self, conf: Confirmation, look: int) -> list[int]:
        """Seeds of look `look` (1-based): the round's confirmation seeds first, then fresh."""
        while len(conf.blocks) < look:
            if not conf.blocks and self.first_block is not None:
                conf.blocks.append(list(self.first_block))
            elif not conf.blocks and self.rnd.confirm_list is not None and self.first is None:
                conf.blocks.append(list(self.rnd.confirm_list))
            else:
                used = self._used_seeds() | {s for b in conf.blocks for s in b}
                conf.blocks.append(fresh_seeds(used, self.rnd.confirm_count))
        return conf.blocks[look - 1]

    def _second_tier(
        self, conf: Confirmation, final: Subset, measured: set[int]
    ) -> tuple[list[int], list[int]]:
        """With the final recipe settled and runs left, what is still worth measuring.

        Left-out contributions whose gain alone was not shown but not ruled out either
        (positive, interval reaching min_effect): screening's few seeds miss real gains of one
        or two noise sds more often than not. And each choice-group member left out for a
        rival in the final recipe: swapped in for it, since the model may have picked the
        weaker of two alternatives. Best first, as many as the budget can pay for whole.

        At a larger rung of a ladder: the contributions the rung below shelved without
        showing them to hurt (`later`, in the ladder's order), since a gain that only a larger
        model shows looks like no gain at the smaller one however many seeds measured it.
        """
        if self.close is not None:
            ranked = [
                (j, 0)
                for j in self.later
                if j not in final and j not in measured and j not in conf.tested
                and not self._grouped_with(j, final)
            ]  # fmt: skip
            return self._affordable(conf, final, ranked)
        left, swaps = [], []
        for j in range(self.n):
            if j in final or j in measured or j in conf.tested:
                continue
            if any(j in g and final.intersection(g) for g in self.rnd.groups):
                alone = self.alone(j)
                if alone is not None and alone.interval.estimate > 0:
                    swaps.append(j)
                continue
            alone = self.alone(j)
            if alone is None or alone.verdict in ("accept", "harm"):
                continue
            if not (alone.interval.estimate > 0 and alone.interval.high >= self.min_effect):
                continue
            if any(
                c.state == "breached" for c in self.guard_checks(frozenset({j}), self.rnd.seeds)
            ):
                continue
            left.append(j)
        ranked = [(j, 1) for j in swaps] + [(j, 0) for j in left]
        ranked.sort(key=lambda x: (-self.alone(x[0]).interval.estimate, x[0]))  # type: ignore[union-attr]
        return self._affordable(conf, final, ranked)

    def _affordable(
        self, conf: Confirmation, final: Subset, ranked: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[int]]:
        """The first of `ranked` (j, is a swap) whose whole look sequences the budget pays."""
        block = self._block(conf, 1)
        chosen: list[Subset] = []
        picked: tuple[list[int], list[int]] = ([], [])
        for j, is_swap in ranked:
            recipe = self._swap(final, j) if is_swap else final | {j}
            # a whole look sequence for it: the first look and, at worst, every later one
            need = self.cost([*chosen, recipe], block) * conf.plan.looks
            if self.used + need > self.budget:
                break
            chosen.append(recipe)
            picked[is_swap].append(j)
        return picked

    def _swap(self, final: Subset, j: int) -> Subset:
        """The final recipe with j in place of its choice-group rivals."""
        rivals = {y for g in self.rnd.groups if j in g for y in g if y in final}
        return (final - rivals) | {j}

    def _run_looks(
        self,
        conf: Confirmation,
        final: Subset,
        members: list[int],
        suspects: list[int],
        attempt: int,
        swaps: Sequence[int] = (),
    ) -> dict[int, Comparison]:
        """Looks of the sequential plan until every comparison is decided or runs run out.

        When the budget cannot pay for another look, the current one is the last: it spends
        the alpha the later looks would have, so a clear answer is still taken; what is not
        clear then stays undecided (it never reached the planned last look).
        """
        plan = conf.plan
        pairs: dict[int, tuple[str, Subset, Subset]] = {
            i: ("loo", final, final - {i}) for i in members
        }
        pairs.update({j: ("added", final | {j}, final) for j in suspects})
        pairs.update({j: ("swap", self._swap(final, j), final) for j in swaps})
        pool = list(dict.fromkeys([final, *(x for m in pairs for x in pairs[m][1:])]))
        open_ = set(pairs)
        comps: dict[int, Comparison] = {}
        guards_open = bool(self.rnd.guardrails)
        seeds: list[int] = []
        spent = 0.0
        for look in range(1, plan.looks + 1):
            block = self._block(conf, look)
            recipes = self._look_recipes(final, pairs, open_, look == 1 or guards_open)
            if self.used + self.cost(recipes, block) > self.budget:
                conf.out_of_budget = True
                break
            self.run_batch("confirmation", recipes, block)
            seeds += block
            noise = self._noise(pool, seeds, UTILITY)
            alpha = plan.alpha_at(look)
            evaluate = dict.fromkeys(sorted(open_), alpha)
            last = look == plan.looks and conf.powered
            verdicts = {m: self._look(pairs[m], seeds, 1 - alpha, noise, last)
                        for m in evaluate}  # fmt: skip
            still = {m for m, (_, v) in verdicts.items() if v == "open"}
            # Whether the next look needs the baseline depends on the guardrails as this look
            # leaves them, not as the last one did.
            guards_open = any(g.state == "open" for g in self.guard_checks(final, seeds, 1 - alpha))
            if look < plan.looks and (still or guards_open):
                after = self._block(conf, look + 1)
                nxt = self._look_recipes(final, pairs, still, guards_open)
                if self.used + self.cost(nxt, after) > self.budget:
                    alpha = plan.alpha - spent  # the last look this attempt can pay for
                    verdicts = {m: self._look(pairs[m], seeds, 1 - alpha, noise, False)
                                for m in evaluate}  # fmt: skip
                    conf.out_of_budget = True
            spent += alpha
            for m, (iv, v) in verdicts.items():
                kind, a, b = pairs[m]
                comps[m] = Comparison(
                    kind, m, a, b, self._shared(a, b, seeds), iv, v, pool, list(seeds),
                    attempt, plan.looks - look,
                )  # fmt: skip
                if v != "open":
                    open_.discard(m)
            conf.guards = self.guard_checks(final, seeds, 1 - alpha)
            guards_open = any(g.state == "open" for g in conf.guards)
            if conf.out_of_budget or (not open_ and not guards_open):
                break
        return comps

    def _look_recipes(
        self,
        final: Subset,
        pairs: Mapping[int, tuple[str, Subset, Subset]],
        open_: Iterable[int],
        with_baseline: bool,
    ) -> list[Subset]:
        """The final recipe, the other side of every open comparison, and the baseline when a
        guardrail (or the first look's final-vs-baseline estimate) needs it."""
        recipes = [frozenset()] if with_baseline else []
        recipes.append(final)
        for m in sorted(open_):
            _, a, b = pairs[m]
            recipes.append(b if a == final else a)
        return list(dict.fromkeys(recipes))

    def _look(
        self,
        pair: tuple[str, Subset, Subset],
        seeds: Sequence[int],
        level: float,
        noise: tuple[float, float],
        final: bool,
    ) -> tuple[Interval, Verdict]:
        _, a, b = pair
        iv = self.paired(a, b, seeds, UTILITY, level, noise)
        return iv, verdict(iv, self.min_effect, final) if iv.n > 0 else "open"

    def _next_recipe(
        self,
        final: Subset,
        comps: Mapping[int, Comparison],
        conf: Confirmation,
        fits: dict[str, EffectsFit],
    ) -> Subset | None:
        """The recipe to confirm next, or None when this one stands.

        A left-out contribution shown to help inside goes in (the best one first); members
        with a decided "no" go out; when several of those each help alone they may stand in
        for each other (a redundant pair both look useless while the other is in), so only
        the weakest goes and the rest are measured again. A shown guardrail breach takes out
        the member that costs the guarded metric most inside the recipe.
        """
        adds = []
        for c in comps.values():
            if c.kind == "loo" or c.verdict != "accept":
                continue
            seeds = [x for b in conf.blocks for x in b]
            broken = [g for g in self.guard_checks(c.a, seeds) if g.state == "breached"]
            if broken:  # it helps, but the recipe with it breaks a guardrail
                conf.removed[c.member] = f"guardrail:{broken[0].guardrail.metric}"
                continue
            adds.append(c)
        if adds:
            best = max(adds, key=lambda c: (c.interval.estimate, -c.member))
            return best.a
        drops = [
            c for c in comps.values() if c.kind == "loo" and c.verdict in ("harm", "small", "none")
        ]
        breached = [g for g in conf.guards if g.state == "breached"]
        if breached and final:
            g = breached[0].guardrail
            seeds = [s for b in conf.blocks for s in b]
            sign = 1.0 if g.direction == "max" else -1.0
            costs = {
                i: sign * self.paired(final, final - {i}, seeds, g.metric, 0.95).estimate
                for i in final
            }
            worst = min(costs, key=lambda i: (costs[i], i))
            conf.removed[worst] = f"guardrail:{g.metric}"
            return final - {worst}
        if not drops:
            return None
        helpful = [c for c in drops if self.helps_alone(c.member)]
        if len(helpful) >= 2:
            weakest = min(helpful, key=lambda c: (c.interval.estimate, c.member))
            out = {weakest.member} | {c.member for c in drops if c not in helpful}
        else:
            out = {c.member for c in drops}
        for m in out:
            conf.removed[m] = comps[m].verdict
        return final - out

    # ------------------------------------------------------------------ direct comparisons

    def value(self, key: str, name: str) -> float:
        """A finished run's metric, or its utility (the objectives' weighted, signed sum)."""
        metrics = self._metrics[key]
        assert metrics is not None
        if name != UTILITY:
            return float(metrics[name])
        return float(utility(metrics, self.objectives))

    def series(self, subset: Subset, seeds: Iterable[int], name: str) -> dict[int, float]:
        """seed -> value of `subset`'s finished runs on `seeds`."""
        out = {}
        for s in seeds:
            key = self.key(subset, s)
            if key in self.points and self._done(key):
                out[s] = self.value(key, name)
        return out

    def _shared(self, a: Subset, b: Subset, seeds: Iterable[int]) -> list[int]:
        ya, yb = self.series(a, seeds, UTILITY), self.series(b, seeds, UTILITY)
        return sorted(set(ya) & set(yb))

    def _noise(
        self, pool: Sequence[Subset], seeds: Iterable[int], name: str
    ) -> tuple[float, float]:
        obs = [(s, seed, v) for s in pool for seed, v in self.series(s, seeds, name).items()]
        return pooled_noise(obs)

    def paired(
        self,
        a: Subset,
        b: Subset,
        seeds: Iterable[int],
        name: str,
        level: float,
        noise: tuple[float, float] | None = None,
    ) -> Interval:
        """a minus b on the seeds both finished, with `noise` pooled or the pair's own."""
        ya, yb = self.series(a, seeds, name), self.series(b, seeds, name)
        shared = sorted(set(ya) & set(yb))
        diffs = [ya[s] - yb[s] for s in shared]
        if noise is not None and not (math.isfinite(noise[0]) and noise[1] > 0):
            noise = None
        return paired_interval(diffs, level, noise)

    def alone(self, j: int) -> Comparison | None:
        """j alone against the baseline on the screening seeds (noise pooled over screening);
        None at a larger rung of a ladder, which has no screening."""
        if self.first is not None:
            return None
        if not hasattr(self, "_alone"):
            self._alone: dict[int, Comparison | None] = {}
        if j not in self._alone:
            seeds = self.rnd.seeds
            single, base = frozenset({j}), frozenset()
            pool = list(dict.fromkeys(p.subset for p in self.points.values() if p.batch == 0))
            noise = self._noise(pool, seeds, UTILITY)
            iv = self.paired(single, base, seeds, UTILITY, SCREEN_LEVEL, noise)
            if iv.n == 0:
                self._alone[j] = None
            else:
                v = verdict(iv, self.min_effect, final=True)
                shared = self._shared(single, base, seeds)
                self._alone[j] = Comparison(
                    "alone", j, single, base, shared, iv, v, pool, list(seeds)
                )
        return self._alone[j]

    def guard_checks(
        self, subset: Subset, seeds: Iterable[int], level: float = SCREEN_LEVEL
    ) -> list[GuardCheck]:
        """Each guardrail of `subset` against the baseline, from their own paired margins."""
        out = []
        for g in self.rnd.guardrails:
            sign = 1.0 if g.direction == "max" else -1.0
            ya = self.series(subset, seeds, g.metric)
            yb = self.series(frozenset(), seeds, g.metric)
            margins = guard_margins(g.kind, g.threshold, sign, ya, yb)
            iv = paired_interval(margins, level)
            state: GuardState = "held" if iv.low >= 0 else "breached" if iv.high < 0 else "open"
            out.append(GuardCheck(g, iv, state, sorted(set(ya) & set(yb))))
        return out

    # ------------------------------------------------------------------ runs

    @property
    def used(self) -> int:
        return len(self.points)

    @property
    def at(self) -> str:
        """ " at rung NAME" inside a ladder, else ""."""
        return f" at rung {self.rung.name}" if self.rung else ""

    def resolve(self, subset: Subset, lr: float | None = None) -> Resolved:
        """The subset's config and code at this session's rung: the rung's patch on top, and
        with lr_tuning the learning rate (`lr`, else the tuned one of the baseline or of the
        other recipes)."""
        if self.rung is None:
            return self.rnd.workspace.resolve(subset)
        extra = dict(self.rung.patch)
        tag: dict[str, Any] = {"rung": self.rung.name}
        if lr is None and self.lr is not None:
            lr = self.lr["base" if not subset else "other"]
        if lr is not None:
            assert self.rnd.spec.lr_tuning is not None
            extra[self.rnd.spec.lr_tuning.key] = lr
            tag["lr"] = lr
        return self.rnd.workspace.resolve(subset, extra, tag)

    def recipe(self, subset: Subset) -> tuple[str, dict[str, Any]]:
        """(hash, config) of the baseline with `subset` applied, without the seed: the hash
        names the config and the code that runs it (workspace.py)."""
        resolved = self.resolve(subset)
        return resolved.run_hash, resolved.data

    def key(self, subset: Subset, seed: int) -> str:
        return run_key(self.recipe(subset)[0], seed)

    def cost(self, subsets: Sequence[Subset], seeds: Sequence[int]) -> int:
        """Runs the design would add (distinct recipe x seed not in it yet)."""
        return len({self.key(s, seed) for s in subsets for seed in seeds} - self.points.keys())

    def run_batch(
        self,
        purpose: str,
        subsets: Sequence[Subset],
        seeds: Sequence[int],
        why: Mapping[Subset, str] | None = None,
        lr: float | None = None,
    ) -> None:
        number = self.first_batch + len(self.batches)
        rung = self.rung.name if self.rung else None
        self.batches.append(
            RunBatch(number, purpose, list(subsets), list(seeds), dict(why or {}), rung, lr)
        )
        keys = []
        recipe = self.rnd.workspace.is_recipe
        for subset in subsets:
            resolved = self.resolve(subset, lr)
            blind = [self.rnd.blind[self.rnd.ids[i]] for i in subset]
            for seed in seeds:
                config = {**resolved.data, "seed": seed} if recipe else resolved.data
                run = self.store.request(
                    resolved.run_hash,
                    seed,
                    blind,
                    self.rnd.name,
                    number,
                    config,
                    code=resolved.code,
                    provenance=resolved.provenance,
                )
                self.points.setdefault(run.key, DesignRun(run.key, subset, seed, number, rung, lr))
                self._resolved[run.key] = resolved
                self._set_aside_stale(blind, seed, run.key, resolved)
                keys.append(run.key)
        runs = self._runs(keys)
        todo = [k for k in dict.fromkeys(keys) if runs[k].status != "done"]
        self.say(
            f"batch {number} ({purpose}{self.at}): {len(subsets)} recipes x {len(seeds)} seeds, "
            f"{len(todo)} to run, {len(set(keys)) - len(todo)} already in the store"
        )
        for subset in subsets:
            if subset in (why or {}):
                self.say(f"  + {self.names(subset)}: {why[subset]}")  # type: ignore[index]
        self._execute(todo)

    def _execute(self, keys: list[str]) -> None:
        if not keys:
            return
        runs_dir = self.out / "runs"
        attempts = self.rnd.spec.runner.attempts
        with progress_bar() as bar:
            task = bar.add_task(f"batch {self.batches[-1].number}", total=len(keys))
            while True:
                self.store.retry_failed(attempts)
                runs = self._runs(keys)
                pending = [k for k in keys if runs[k].status == "pending"]
                claimed = self.store.claim_pending(len(pending), keys=pending) if pending else []
                if not claimed:
                    if self._wait_for_others(keys):
                        continue
                    break
                jobs = [self._job(r, runs_dir) for r in claimed]
                for outcome in self.executor.run(self.runner, jobs):
                    self._record(outcome)
                    if outcome.key in self.points:
                        bar.advance(task)

    def _job(self, run: Run, runs_dir: Path) -> Job:
        """The job of a claimed run: its config file, and the tree it runs in."""
        resolved = self._resolved.get(run.key)
        if resolved is None:  # not this session's run (cannot happen: claims are by key)
            return Job(run.key, run.recipe, run.seed, runs_dir / run.key)
        return Job(
            run.key,
            run.recipe,
            run.seed,
            runs_dir / run.key,
            config_text=resolved.text,
            config_name=resolved.filename,
            cwd=self.rnd.workspace.cwd(resolved),
        )

    def _set_aside_stale(self, blind: list[str], seed: int, key: str, new: Resolved) -> None:
        """Earlier runs of this round, subset and seed under another key: made by other code
        or from another config, they are not reused. Count them, with the reason."""
        for old in self._earlier.get(_earlier_key(blind, seed, new.provenance), []):
            if old.key == key or old.key in self.stale:
                continue
            self.stale[old.key] = _stale_reason(old, new)

    def _record(self, outcome: Outcome) -> None:
        """Store a run's outcome. With a shared store, another engine may have finished the
        same run first (it claimed it after this engine's lease lapsed): its result stands."""
        point = self.points.get(outcome.key)
        where = self.names(point.subset) if point else outcome.key
        try:
            if outcome.metrics is not None:
                self.store.finish(outcome.key, outcome.metrics, outcome.seconds)
            else:
                self.store.fail(outcome.key, outcome.error or "failed")
        except StoreError:
            run = self.store.get(outcome.key)
            if run is None or run.status != "done":
                raise
            self.say(f"  run ({where}) was finished by another engine first; its result is kept")
            return
        if outcome.metrics is None:
            first = (outcome.error or "").splitlines()[0][:200] if outcome.error else ""
            self.say(f"  [red]run failed[/] ({where}): {escape(first)}")
        elif self.tracker is not None and point is not None:  # blind ids, as in the store
            blind = [self.rnd.blind[self.rnd.ids[i]] for i in point.subset]
            self.tracker.log_run(outcome.key, point.seed, blind, outcome.metrics, point.batch)

    def _wait_for_others(self, keys: list[str]) -> bool:
        """Runs another engine claimed (a shared store): wait until none is running; True if
        some came back to pending meanwhile (their engine died, or a failure is retried)."""
        attempts = self.rnd.spec.runner.attempts
        while True:
            self.store.reset_dead()
            self.store.retry_failed(attempts)
            runs = self._runs(keys)
            if any(r.status == "pending" for r in runs.values()):
                return True
            if not any(r.status == "running" for r in runs.values()):
                return False
            time.sleep(1.0)

    def _runs(self, keys: Sequence[str]) -> dict[str, Run]:
        runs = {}
        for k in dict.fromkeys(keys):
            run = self.store.get(k)
            assert run is not None
            runs[k] = run
        return runs

    def _done(self, key: str) -> bool:
        """Has this run finished? (Finished runs never change, so their metrics are cached.)"""
        if key not in self._metrics:
            run = self.store.get(key)
            if run is None or run.status != "done" or run.metrics is None:
                return False
            self._metrics[key] = dict(run.metrics)
        return True

    def _used_seeds(self) -> set[int]:
        used = {p.seed for p in self.points.values()} | set(self.rnd.confirm_list or [])
        return used | self.avoid_seeds

    def measured(self) -> set[Subset]:
        runs = self._runs(list(self.points))
        return {p.subset for p in self.points.values() if runs[p.key].status == "done"}

    def fit(self, seeds: set[int] | None = None) -> dict[str, EffectsFit]:
        """One effects fit per metric on the done runs of the design (same runs, same order);
        `seeds` keeps only the runs on those seeds (one batch's own evidence)."""
        runs = self._runs(list(self.points))
        done = [
            (p, runs[p.key])
            for p in self.points.values()
            if runs[p.key].status == "done" and (seeds is None or p.seed in seeds)
        ]
        if not done:
            failures = [r.error for r in runs.values() if r.error]
            first = f"; first failure: {failures[0]}" if failures else ""
            raise StacklabError(f"round {self.rnd.name}: no run has succeeded{first}")
        fits = {}
        for metric in self.rnd.metrics:
            obs = [(p.subset, p.seed, float(r.metrics[metric])) for p, r in done if r.metrics]
            fits[metric] = fit_effects(obs, self.n, "all", draws=self.rnd.spec.draws, rng_seed=0)
        return fits

    # ------------------------------------------------------------------ output

    def names(self, subset: Subset, blind: bool = True) -> str:
        if not subset:
            return "baseline"
        ids = [self.rnd.ids[i] for i in sorted(subset)]
        return " + ".join(self.rnd.blind[c] if blind else c for c in ids)

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def _measure_culprits(self, conf: Confirmation, fits: dict[str, EffectsFit]) -> None:
        """For each contribution shown to hurt inside the final recipe, run it paired with the
        member the model suspects most (on the screening seeds, beside their runs alone), so
        the conflict is named with a measured interaction, not a modelled one."""
        util = UtilityDraws(fits, self.objectives)
        pairs = []
        for j, c in sorted(conf.tested.items()):
            if c.verdict != "harm":
                continue
            others = sorted(conf.final - {j})
            if not others:
                continue
            gamma = {y: util.interaction(j, y) for y in others}
            y = min(others, key=lambda k: (gamma[k], k))
            if gamma[y] < 0:
                pairs.append(frozenset({j, y}))
        pairs = list(dict.fromkeys(pairs))
        if not pairs:
            return
        if self.used + self.cost(pairs, self.rnd.seeds) > self.budget:
            self.notes.append("no budget left to measure the interactions behind conflicts")
            return
        self.run_batch("interaction", pairs, self.rnd.seeds)

    def interaction(self, i: int, y: int, name: str) -> Interval | None:
        """y(i+y) - y(i) - y(y) + y(baseline), per screening seed, with the screening noise."""
        seeds = self.rnd.seeds
        parts = [frozenset({i, y}), frozenset({i}), frozenset({y}), frozenset()]
        values = [self.series(s, seeds, name) for s in parts]
        shared = sorted(set.intersection(*(set(v) for v in values)))
        if not shared:
            return None
        contrast = [interaction_contrast(*(v[s] for v in values)) for s in shared]
        pool = list(dict.fromkeys(p.subset for p in self.points.values() if p.batch == 0))
        noise = self._noise(pool, seeds, name)
        if not (math.isfinite(noise[0]) and noise[1] > 0):
            return paired_interval(contrast, SCREEN_LEVEL)
        return paired_interval(contrast, SCREEN_LEVEL, noise, terms=4)

    def evidence(self, views: Views, conf: Confirmation) -> Evidence:
        return Evidence(self, views, conf, self._runs(list(self.points)))

    def _result(self, found: Searched, ladder: LadderOutcome | None = None) -> RoundResult:
        """decision.json and what the reports draw; with a ladder, its upper rungs' verdicts
        replace the first rung's where they were measured (ladder.py)."""
        rnd, ids, conf = self.rnd, self.rnd.ids, found.conf
        points = [*self.points.values(), *(ladder.points if ladder else [])]
        runs = self._runs(list(dict.fromkeys(p.key for p in points)))
        ev = self.evidence(found.views, conf)
        decisions = [ev.decide(i) for i in range(self.n)]
        if ladder is not None:
            decisions = ladder.merge(decisions)
        selected = frozenset(i for i in range(self.n) if decisions[i].status == "accepted")
        ev.final = selected
        credit = ev.credit()
        batches = [*self.batches, *(ladder.batches if ladder else [])]
        record = DecisionRecord(
            round=rnd.name,
            round_file=str(rnd.file),
            baseline=str(rnd.baseline_path),
            selected=[ids[i] for i in sorted(selected)],
            shelved={d.id: d.reason for d in decisions if d.status == "shelved"},
            undecided={d.id: d.reason for d in decisions if d.status == "undecided"},
            decisions=decisions,
            credit={
                ids[i]: {metric: table[i].shapley.estimate for metric, table in credit.items()}
                for i in range(self.n)
                if credit and i in credit[UTILITY]
            },
            credit_table=ev.credit_table(credit),
            runs=RunCounts.of(runs.values(), rnd.name, rnd.spec.budget, len(self.stale)),
            stale=_count_reasons(self.stale),
            code=CodeSummary.of(rnd),
            predicted=ladder.predicted(selected) if ladder else ev.predicted(selected),
            objectives=[ObjectiveRecord.of(o) for o in rnd.objectives],
            scales={o.name: o.scale for o in self.objectives},
            min_effect=self.min_effect,
            level=rnd.spec.level,
            noise_floor={m: finite([v])[0] for m, v in self.noise_floor.items()},
            power=Power(
                max_seeds=self.power["max_seeds"],
                detectable_gain=finite([self.power["detectable_gain"]])[0],
            ),
            guardrails=[GuardrailRecord.of(g) for g in rnd.guardrails],
            guardrail_checks=ladder.guardrail_checks() if ladder else ev.guardrail_checks(),
            confirmation=ConfirmationRecord.of(conf, found.chosen, ids, self.reserve),
            pareto=[[ids[i] for i in sorted(s)] for s in found.choice.pareto],
            stopped=found.stopped,
            batches=[BatchRecord.of(b) for b in batches],
            notes=[*self.notes, *ev.notes, *(ladder.notes if ladder else [])],
            ladder=ladder.summary() if ladder else None,
        )
        return RoundResult(
            decision=record,
            round=rnd,
            views=found.views,
            choice=found.choice,
            final=selected,
            batches=batches,
            points=points,
            runs=runs,
            credit=credit,
            discoveries=ev.discoveries,
        )


__all__ = ["RoundResult", "integrate"]


def _stale_reason(old: Run, new: Resolved) -> str:
    """Why an earlier run of the same subset and seed is not this round's run."""
    if old.code is None:
        return "it was stored before runs recorded their code"
    if old.code != new.code:
        before, after = old.provenance or {}, new.provenance
        if "tree" in after:
            return _moved(before, after) or "the code changed (another tree)"
        return stale_reason(dict(before.get("files", {})), dict(after.get("files", {})))
    return "the config changed"


def _moved(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Which refs of a git round moved between two runs of one subset ("" if none did)."""
    parts = []
    if before.get("base") and before["base"] != after.get("base"):
        parts.append(f"the base moved ({before['base'][:7]} -> {str(after.get('base'))[:7]})")
    old_refs = before.get("refs") or {}
    for ref, commit in (after.get("refs") or {}).items():
        if old_refs.get(ref) not in (None, commit):
            parts.append(f"{ref} moved ({old_refs[ref][:7]} -> {commit[:7]})")
    return "; ".join(parts)


def _earlier_key(
    subset: Iterable[str], seed: int, provenance: Mapping[str, Any] | None
) -> tuple[Any, ...]:
    """Runs that stand for the same thing: one subset (blind ids) and seed at one rung and
    learning rate. Two of them under different keys: the older was made by other code."""
    prov = provenance or {}
    return (tuple(sorted(subset)), seed, prov.get("rung"), prov.get("lr"))


def _count_reasons(stale: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for why in stale.values():
        counts[why] = counts.get(why, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
