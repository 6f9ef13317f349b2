"""The integration engine: plan -> run -> fit -> choose -> confirm -> decide -> credit -> report.

`integrate(round_file, out_dir)` runs one round to its decision. Why it is built this way:

* **The store is the memory.** Every run goes through the run store, content-addressed by
  recipe hash and seed, so a run is trained once whichever batch or round asks for it.
  The plan is a deterministic function of the finished runs (fits use fixed bootstrap
  seeds, and only the runs of the design so far), so killing the engine at any moment and
  starting it again replays the same plan, finds the finished runs in the store, runs what
  is missing and reaches the same decision.
* **Blind until decided.** While the round runs, the store and the terminal know
  contributions only by blind ids; real ids appear in the outputs written after the
  decisions, and authors only in the credit table.
* **Decisions carry their evidence.** Each contribution ends `accepted` (its leave-one-out
  gain inside the final recipe is significant) or `shelved` with the first reason that
  applies: its runs all failed; it is in a choice group with a selected contribution; it
  breaks a guardrail; no measurable gain alone (after false-discovery control across
  contributions); it conflicts with a selected contribution (adding it to the final recipe
  hurts, and the pair's interaction says with whom); or its gain vanishes in combination.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from stacklab.errors import StacklabError
from stacklab.integrate.contributions import apply_subset
from stacklab.integrate.credit import MAX_PLAYERS, Credit, credit_with_intervals
from stacklab.integrate.effects import (
    EffectsFit,
    benjamini_hochberg,
    bootstrap_p_value,
    fit_effects,
)
from stacklab.integrate.planner import (
    Proposal,
    Subset,
    UtilityDraws,
    confirmation_design,
    fresh_seeds,
    guardrail_probability,
    propose,
    screening_design,
    suspects,
)
from stacklab.integrate.report import write_reports
from stacklab.integrate.round import Round, RoundError, load_round
from stacklab.integrate.runners import (
    CommandRunner,
    Executor,
    Job,
    make_executor,
    make_runner,
)
from stacklab.integrate.select import Choice, Guardrail, candidate_subsets, objective_scale
from stacklab.integrate.store import Run, RunStore, run_key
from stacklab.progress import progress_bar
from stacklab.recipe import canonical_hash

MAX_BATCHES = 50  # adaptive batches; the budget normally stops a round long before
UTILITY = "utility"


@dataclass(frozen=True)
class DesignRun:
    """A run of the design: which subset, which seed, in which batch it was first planned."""

    key: str
    subset: Subset
    seed: int
    batch: int


@dataclass(frozen=True)
class Batch:
    """One batch of the plan: recipes x seeds, with why the adaptive ones were proposed."""

    number: int
    purpose: str  # screening | adaptive | confirmation
    subsets: list[Subset]
    seeds: list[int]
    why: dict[Subset, str]


@dataclass(frozen=True)
class Views:
    """Fits of the same round on different runs; each question is asked of the runs made for it.

    `full`: every run (selection, interactions, credit). `screen`: the screening seeds, where
    every contribution ran alone on every seed (gain alone, guardrails alone). `confirm`: the
    confirmation seeds (gains inside the final recipe, and what adding a shelved one does).
    """

    full: dict[str, EffectsFit]
    screen: dict[str, EffectsFit]
    confirm: dict[str, EffectsFit] | None


@dataclass
class RoundResult:
    """Everything the reports show; `decision` is decision.json."""

    decision: dict[str, Any]
    round: Round
    views: Views  # effects fits: on every run, on the screening seeds, on the confirmation seeds
    choice: Choice
    final: Subset
    batches: list[Batch]
    points: list[DesignRun]
    runs: dict[str, Run]
    credit: dict[str, dict[int, Credit]]  # metric or "utility" -> contribution -> credit
    discoveries: dict[tuple[int, str], bool]  # (contribution, objective) -> BH discovery


def integrate(
    round_file: str | Path, out_dir: str | Path, console: Console | None = None
) -> RoundResult:
    """Run a round to its decision; write decision.json, report.md and report.html in out_dir."""
    rnd = load_round(round_file)
    out = Path(out_dir).absolute()  # runs execute in the round file's folder
    out.mkdir(parents=True, exist_ok=True)
    url = rnd.spec.store or f"sqlite:///{(out / 'runs.db').resolve()}"
    runner = make_runner(rnd.spec.runner, rnd.file.parent, rnd.metrics, rnd.workers)
    executor = make_executor(rnd.spec.executor, rnd.workers)
    _remove_partial_runs(out / "runs")
    console = console or Console(stderr=True)
    with RunStore(url) as store:
        result = _Session(rnd, out, store, runner, executor, console).run()
    write_reports(result, out)
    console.print(
        f"[bold]decision[/] in {escape(str(out / 'decision.json'))}; "
        f"report: {escape(str(out / 'report.html'))}",
        highlight=False,
    )
    return result


def _remove_partial_runs(runs_dir: Path) -> None:
    """Temporary run folders left by a killed engine: their runs are pending again."""
    if runs_dir.is_dir():
        for tmp in runs_dir.glob(".*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


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
    ):
        self.rnd, self.out, self.store = rnd, out, store
        self.runner, self.executor, self.console = runner, executor, console
        self.n = len(rnd.contributions)
        self.points: dict[str, DesignRun] = {}
        self.batches: list[Batch] = []
        self._recipes: dict[Subset, tuple[str, dict[str, Any]]] = {}
        self.notes: list[str] = []

    # ------------------------------------------------------------------ the round

    def run(self) -> RoundResult:
        rnd, spec = self.rnd, self.rnd.spec
        candidates = candidate_subsets(self.n, rnd.groups)
        screen = screening_design(self.n, rnd.groups)
        need = len(screen) * len(rnd.seeds) + 2 * rnd.confirm_count
        if spec.budget < need:
            raise RoundError(
                f"{rnd.file}: budget {spec.budget} is below what screening "
                f"({len(screen)} recipes x {len(rnd.seeds)} seeds) and a minimal confirmation "
                f"(2 x {rnd.confirm_count}) need: {need}"
            )
        self.say(
            f"[bold]round {rnd.name}[/]: {self.n} contributions "
            f"({', '.join(rnd.blind[c] for c in rnd.ids)}), {len(candidates)} allowed subsets, "
            f"budget {spec.budget} runs"
        )
        self.run_batch("screening", screen, rnd.seeds)

        stopped = "confident"
        while True:
            fits = self.fit()
            proposal = self._propose(fits, candidates)
            chosen = proposal.chosen
            self.say(f"  choice so far: {self.names(chosen)}")
            if not proposal.subsets:
                break
            reserve = self._confirmation_cost(fits, chosen)
            seeds = fresh_seeds(self._used_seeds(), len(rnd.seeds))
            subsets = [frozenset(), *proposal.subsets]
            while (
                len(subsets) > 1 and self.used + self.cost(subsets, seeds) + reserve > spec.budget
            ):
                subsets.pop()
            if len(subsets) == 1 or len(self.batches) >= MAX_BATCHES:
                stopped = "budget" if len(subsets) == 1 else "batch limit"
                break
            self.run_batch("adaptive", subsets, seeds, proposal.why)

        culprits = suspects(
            fits, rnd.objectives, rnd.guardrails, chosen, self.n, rnd.groups,
            spec.confidence, spec.guardrail_prob,
        )  # fmt: skip
        confirm_seeds = self._confirm_seeds()
        design = self._fit_budget(confirmation_design(chosen, culprits), confirm_seeds, chosen)
        if design:
            self.run_batch("confirmation", design, confirm_seeds)
            final, demoted = self._demote(chosen, confirm_seeds, list(culprits))
        else:
            self.notes.append("no budget left for a confirmation batch: the choice is unconfirmed")
            final, demoted = chosen, []
        fits = self.fit()
        choice = self._propose(fits, candidates).table
        screen = self.fit(set(rnd.seeds)) if self._succeeded(set(rnd.seeds)) else fits
        confirm = self.fit(set(confirm_seeds)) if self._succeeded(set(confirm_seeds)) else None
        views = Views(full=fits, screen=screen, confirm=confirm)
        return self._result(views, choice, chosen, final, demoted, stopped, confirm_seeds)

    def _propose(self, fits: dict[str, EffectsFit], candidates: list[Subset]) -> Proposal:
        spec = self.rnd.spec
        return propose(
            fits, self.rnd.objectives, self.rnd.guardrails, candidates, self.measured(),
            {p.subset for p in self.points.values()}, spec.confidence, spec.guardrail_prob,
            spec.margin,
        )  # fmt: skip

    def _confirm_seeds(self) -> list[int]:
        if self.rnd.confirm_list is not None:
            return self.rnd.confirm_list
        return fresh_seeds(self._used_seeds(), self.rnd.confirm_count)

    def _used_seeds(self) -> set[int]:
        return {p.seed for p in self.points.values()} | set(self.rnd.confirm_list or [])

    def _confirmation_cost(self, fits: dict[str, EffectsFit], chosen: Subset) -> int:
        """Runs to hold back for confirming `chosen`, and for re-confirming after one demotion."""
        spec = self.rnd.spec
        culprits = suspects(
            fits, self.rnd.objectives, self.rnd.guardrails, chosen, self.n, self.rnd.groups,
            spec.confidence, spec.guardrail_prob,
        )  # fmt: skip
        confirm = self.cost(confirmation_design(chosen, culprits), self._confirm_seeds())
        return confirm + (len(chosen) + len(culprits)) * self.rnd.confirm_count

    def _fit_budget(self, design: list[Subset], seeds: list[int], chosen: Subset) -> list[Subset]:
        """Cut the confirmation's tail (culprit pairs, add-ones) until it fits the budget."""
        must = 2 + len(chosen)
        design = list(design)
        while len(design) > must and self.used + self.cost(design, seeds) > self.rnd.spec.budget:
            design.pop()
        if self.used + self.cost(design, seeds) > self.rnd.spec.budget:
            return []
        return design

    def _demote(
        self, chosen: Subset, seeds: list[int], suspects: list[int]
    ) -> tuple[Subset, list[int]]:
        """Drop, one at a time, the member whose gain inside the final recipe is weakest.

        Tested on the confirmation runs alone: every one of their recipes ran on every
        confirmation seed, and none of them took part in choosing, so the test is neither
        flattered by the choice nor thinned by seeds that say nothing about it. One member at
        a time, because two redundant members each look useless while the other is in: after
        a demotion the leave-one-outs of what remains are run and tested again. Of several
        weak members, the one whose removal costs least by the fit on every run goes first.
        """
        final, demoted = set(chosen), []
        while final:
            fset = frozenset(final)
            members = sorted(fset)
            needed = [fset, *(fset - {i} for i in members)]
            fits = self.fit(set(seeds)) if self._succeeded(set(seeds)) else None
            if fits is None or not all(_estimable(fits, s) for s in needed):
                design = confirmation_design(fset, dict.fromkeys(suspects + demoted))
                extra = self._fit_budget(design, seeds, fset)
                if not extra or self.cost(extra, seeds) == 0:
                    why = "no budget left" if not extra else "their runs failed"
                    self.notes.append(
                        f"could not confirm {self.names(fset, blind=False)} ({why}): its "
                        "members are kept on the evidence so far"
                    )
                    break
                self.run_batch("confirmation", extra, seeds)
                continue
            util = UtilityDraws(fits, self.rnd.objectives)
            gains = {i: util.diff(fset, fset - {i}) for i in members}
            pvals = {i: bootstrap_p_value(gains[i][1]) for i in members}
            found = benjamini_hochberg(pvals, q=self.rnd.spec.fdr)
            weak = [i for i in members if not (found[i] and gains[i][0] > 0)]
            if not weak:
                break
            # Which weak member goes first is a comparison between recipes, not a test:
            # ask every run (the full fit), whose estimates are far less noisy.
            full = UtilityDraws(self.fit(), self.rnd.objectives)
            worst = min(weak, key=lambda i: (full.diff(fset, fset - {i})[0], -pvals[i]))
            final.discard(worst)
            demoted.append(worst)
            self.say(f"  demoted {self.rnd.blind[self.rnd.ids[worst]]}: no significant gain inside")
        return frozenset(final), demoted

    # ------------------------------------------------------------------ runs

    @property
    def used(self) -> int:
        return len(self.points)

    def recipe(self, subset: Subset) -> tuple[str, dict[str, Any]]:
        """(hash, dict) of the baseline with `subset` applied, without the seed."""
        if subset not in self._recipes:
            ids = {self.rnd.ids[i] for i in subset}
            data = apply_subset(self.rnd.baseline, self.rnd.contributions, ids).to_dict()
            data.pop("seed")
            self._recipes[subset] = (canonical_hash(data), data)
        return self._recipes[subset]

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
    ) -> None:
        number = len(self.batches)
        self.batches.append(Batch(number, purpose, list(subsets), list(seeds), dict(why or {})))
        keys = []
        for subset in subsets:
            recipe_hash, data = self.recipe(subset)
            blind = [self.rnd.blind[self.rnd.ids[i]] for i in subset]
            for seed in seeds:
                run = self.store.request(
                    recipe_hash, seed, blind, self.rnd.name, number, {**data, "seed": seed}
                )
                self.points.setdefault(run.key, DesignRun(run.key, subset, seed, number))
                keys.append(run.key)
        runs = self._runs(keys)
        todo = [k for k in dict.fromkeys(keys) if runs[k].status != "done"]
        self.say(
            f"batch {number} ({purpose}): {len(subsets)} recipes x {len(seeds)} seeds, "
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
            task = bar.add_task(f"batch {len(self.batches) - 1}", total=len(keys))
            while True:
                self.store.retry_failed(attempts)
                runs = self._runs(keys)
                pending = [k for k in keys if runs[k].status == "pending"]
                if not pending:
                    break
                claimed = self.store.claim_pending(len(pending), keys=pending)
                if not claimed:
                    break
                jobs = [Job(r.key, r.recipe, r.seed, runs_dir / r.key) for r in claimed]
                for outcome in self.executor.run(self.runner, jobs):
                    if outcome.metrics is not None:
                        self.store.finish(outcome.key, outcome.metrics)
                    else:
                        self.store.fail(outcome.key, outcome.error or "failed")
                        point = self.points.get(outcome.key)
                        where = self.names(point.subset) if point else outcome.key
                        first = (outcome.error or "").splitlines()[0][:200] if outcome.error else ""
                        self.say(f"  [red]run failed[/] ({where}): {escape(first)}")
                    if outcome.key in self.points:
                        bar.advance(task)
            self._wait_for_others(keys)

    def _wait_for_others(self, keys: list[str]) -> None:
        """Runs another process claimed (a shared store): wait until they are finished."""
        while True:
            running = [k for k, r in self._runs(keys).items() if r.status == "running"]
            if not running:
                return
            time.sleep(1.0)

    def _runs(self, keys: Sequence[str]) -> dict[str, Run]:
        runs = {}
        for k in dict.fromkeys(keys):
            run = self.store.get(k)
            assert run is not None
            runs[k] = run
        return runs

    def measured(self) -> set[Subset]:
        runs = self._runs(list(self.points))
        return {p.subset for p in self.points.values() if runs[p.key].status == "done"}

    def _succeeded(self, seeds: set[int]) -> bool:
        """Has any run of the design on these seeds finished?"""
        runs = self._runs([p.key for p in self.points.values() if p.seed in seeds])
        return any(r.status == "done" for r in runs.values())

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

    def _result(
        self,
        views: Views,
        choice: Choice,
        chosen: Subset,
        final: Subset,
        demoted: list[int],
        stopped: str,
        confirm_seeds: list[int],
    ) -> RoundResult:
        rnd, ids = self.rnd, self.rnd.ids
        runs = self._runs(list(self.points))
        ev = _Evidence(rnd, views, self.points, runs, final)
        decisions = [ev.decide(i) for i in range(self.n)]
        credit = ev.credit()
        status = [runs[p.key] for p in self.points.values()]
        decision = {
            "round": rnd.name,
            "round_file": str(rnd.file),
            "baseline": str(rnd.baseline_path),
            "selected": [ids[i] for i in sorted(final)],
            "shelved": {d["id"]: d["reason"] for d in decisions if d["status"] == "shelved"},
            "decisions": decisions,
            "credit": {
                ids[i]: {metric: table[i].shapley.estimate for metric, table in credit.items()}
                for i in range(self.n)
                if credit and i in credit[UTILITY]
            },
            "credit_table": ev.credit_table(credit),
            "runs": {
                "executed": sum(r.status == "done" and r.round == rnd.name for r in status),
                "reused": sum(r.status == "done" and r.round != rnd.name for r in status),
                "failed": sum(r.status == "failed" for r in status),
                "total": len(status),
                "budget": rnd.spec.budget,
            },
            "predicted": ev.predicted(final),
            "objectives": [
                {"metric": o.name, "direction": o.direction, "weight": o.weight, "scale": o.scale}
                for o in rnd.objectives
            ],
            "guardrails": [
                {
                    "metric": g.metric,
                    "kind": g.kind,
                    "threshold": g.threshold,
                    "direction": g.direction,
                }
                for g in rnd.guardrails
            ],
            "confirmation": {
                "chosen": [ids[i] for i in sorted(chosen)],
                "demoted": [ids[i] for i in demoted],
                "seeds": confirm_seeds,
            },
            "pareto": [[ids[i] for i in sorted(s)] for s in choice.pareto],
            "stopped": stopped,
            "batches": [
                {
                    "batch": b.number,
                    "purpose": b.purpose,
                    "recipes": len(b.subsets),
                    "seeds": b.seeds,
                }
                for b in self.batches
            ],
            "notes": self.notes + ev.notes,
        }
        return RoundResult(
            decision=decision,
            round=rnd,
            views=views,
            choice=choice,
            final=final,
            batches=self.batches,
            points=list(self.points.values()),
            runs=runs,
            credit=credit,
            discoveries=ev.discoveries,
        )


# ---------------------------------------------------------------------- evidence and decisions


class _Evidence:
    """Turns the fits into decisions with reasons, and into credit."""

    def __init__(
        self,
        rnd: Round,
        views: Views,
        points: Mapping[str, DesignRun],
        runs: Mapping[str, Run],
        final: Subset,
    ):
        self.rnd, self.views, self.final = rnd, views, final
        self.fits = views.full
        self.scales = {o.name: objective_scale(self.fits[o.name], o) for o in rnd.objectives}
        self.notes: list[str] = []
        self.ok_runs = dict.fromkeys(range(len(rnd.ids)), 0)
        self.errors: dict[int, str] = {}
        for p in points.values():
            run = runs[p.key]
            for i in p.subset:
                if run.status == "done":
                    self.ok_runs[i] += 1
                elif run.status == "failed" and run.error:
                    self.errors.setdefault(i, run.error)
        n, spec = len(rnd.ids), rnd.spec
        screen = views.screen
        screen_util = self.util(screen)
        alone = {i: screen_util({i}) for i in range(n)}
        pv = {
            i: bootstrap_p_value(d) if _estimable(screen, {i}) else math.nan
            for i, (_, d) in alone.items()
        }
        found = benjamini_hochberg(pv, q=spec.fdr)
        self.gain_alone = {i: found[i] and alone[i][0] > 0 for i in range(n)}
        per_objective = {
            (i, o.name): screen[o.name].main_effects[i].p_value
            for o in rnd.objectives
            for i in range(n)
        }
        self.discoveries = benjamini_hochberg(per_objective, q=spec.fdr)

    def util(self, fits: Mapping[str, EffectsFit]) -> UtilityDraws:
        """Utility on `fits`, in the units of the full fit (so views agree on the exchange)."""
        return UtilityDraws(fits, self.rnd.objectives, self.scales)

    def best_view(self, *subsets: Subset) -> tuple[dict[str, EffectsFit], bool]:
        """The confirmation fit when it ran these recipes, else the full fit; and whether the
        runs determine the answer at all."""
        if self.views.confirm is not None and all(
            _estimable(self.views.confirm, s) for s in subsets
        ):
            return self.views.confirm, True
        return self.fits, all(_estimable(self.fits, s) for s in subsets)

    # -- quantities

    def describe_diff(self, fits: Mapping[str, EffectsFit], a: Subset, b: Subset) -> str:
        """Per-objective change from b to a (and the utility, with several objectives)."""
        parts = []
        for o in self.rnd.objectives:
            if o.weight > 0:
                ea, da = fits[o.name].predict_delta(a)
                eb, db = fits[o.name].predict_delta(b)
                parts.append(f"{o.name} {_fmt(*_interval(ea - eb, da - db))}")
        if len(parts) > 1:
            parts.append(f"utility {_fmt(*_interval(*self.util(fits).diff(a, b)))}")
        return "; ".join(parts)

    def predicted(self, subset: Subset) -> dict[str, list[float]]:
        """Final recipe vs baseline, from the confirmation runs when they measured it."""
        fits, _ = self.best_view(subset)
        out = {}
        for m in self.rnd.metrics:
            est, draws = fits[m].predict_delta(subset)
            out[m] = list(_interval(est, draws))
        out[UTILITY] = list(_interval(*self.util(fits)(subset)))
        return out

    # -- decisions

    def decide(self, i: int) -> dict[str, Any]:
        rnd, final = self.rnd, self.final
        c = rnd.contributions[i]
        base = {"id": c.id, "blind_id": rnd.blind[c.id], "area": c.area, "summary": c.summary}
        if i in final:
            rest = final - {i}
            fits, _ = self.best_view(final, rest)
            text = self.describe_diff(fits, final, rest)
            reason = f"gain inside the final recipe (leave-one-out): {text}"
            return {**base, "status": "accepted", "kind": "accepted", "reason": reason}
        kind, reason = self._shelve_reason(i)
        return {**base, "status": "shelved", "kind": kind, "reason": reason}

    def _shelve_reason(self, i: int) -> tuple[str, str]:
        rnd, final, ids = self.rnd, self.final, self.rnd.ids
        if self.ok_runs[i] == 0:
            error = self.errors.get(i, "no run finished")
            return "failed", f"every run with it failed: {error.splitlines()[0][:300]}"
        for group in rnd.groups:
            rivals = sorted(final.intersection(group)) if i in group else []
            if rivals:
                y = rivals[0]
                keys = _shared_keys(rnd.contributions[i].patch, rnd.contributions[y].patch)
                return "conflict", (
                    f"conflicts with {ids[y]}: both set {', '.join(keys)} (a choice group), "
                    f"and the final recipe takes {ids[y]}"
                )
        alone, added = frozenset({i}), final | {i}
        screen = self.views.screen
        checks = [(screen if _estimable(screen, alone) else self.fits, alone, "alone")]
        fits_added, known = self.best_view(added)
        if known:
            checks.append((fits_added, added, "added to the final recipe"))
        for fits, subset, where in checks:
            broken = self._broken_guardrail(fits, subset)
            if broken is not None:
                g, text = broken
                return "guardrail", (
                    f"regresses {g.metric} beyond its guardrail ({_guard_text(g)}): {text} {where}"
                )
        alone_text = self.describe_diff(screen, alone, frozenset())
        if not self.gain_alone[i]:
            _, draws = self.util(screen)(alone)
            if np.quantile(draws, 0.975) < 0:
                return "no_gain", f"no gain, a net loss: {alone_text} alone"
            return "no_gain", f"no measurable gain: {alone_text} alone"
        _, draws = self.util(fits_added).diff(added, final)
        basis = "" if known else " (model prediction: that recipe was not run)"
        change = self.describe_diff(fits_added, added, final)
        if _excludes_zero(draws) and np.median(draws) < 0:
            culprit = self._culprit(i)
            if culprit is not None:
                y, gamma = culprit
                return "conflict", (
                    f"conflicts with {ids[y]}: interaction {gamma}; added to the final recipe: "
                    f"{change}{basis}"
                )
            return "conflict", f"conflicts with the final recipe: added to it: {change}{basis}"
        if _excludes_zero(draws):
            return "not_selected", (
                f"helps alone ({alone_text}) and added to the final recipe ({change}{basis}), "
                "but no allowed subset with it was safely better"
            )
        return "vanishes", (
            f"gain vanishes in combination: alone {alone_text}; added to the final recipe "
            f"{change}{basis}"
        )

    def _broken_guardrail(
        self, fits: Mapping[str, EffectsFit], subset: Subset
    ) -> tuple[Guardrail, str] | None:
        """The guardrail most likely broken by `subset`, if any holds with too low a probability."""
        worst: tuple[float, Guardrail] | None = None
        for g in self.rnd.guardrails:
            p = guardrail_probability(fits, [g], subset)
            if p < self.rnd.spec.guardrail_prob and (worst is None or p < worst[0]):
                worst = (p, g)
        if worst is None:
            return None
        g = worst[1]
        fit = fits[g.metric]
        est, draws = fit.predict_delta(subset)
        if g.kind == "ratio":
            ratio = (fit.baseline + est) / fit.baseline
            low, high = np.quantile(
                (fit.baseline_draws + draws) / fit.baseline_draws, [0.025, 0.975]
            )
            return g, f"{ratio:.3f} [{low:.3f}, {high:.3f}] x baseline"
        return g, f"change {_fmt(*_interval(est, draws))}"

    def _culprit(self, i: int) -> tuple[int, str] | None:
        """The final member whose identified interaction with i is most clearly harmful."""
        util = self.util(self.fits)
        best: tuple[float, int, str] | None = None
        for y in sorted(self.final):
            pair = frozenset({i, y})
            if not _estimable(self.fits, pair):
                continue
            e_p, d_p = util(pair)
            e_i, d_i = util({i})
            e_y, d_y = util({y})
            est, draws = e_p - e_i - e_y, d_p - d_i - d_y
            if not (_excludes_zero(draws) and est < 0):
                continue
            if best is None or est < best[0]:
                text = "; ".join(
                    f"{o.name} {_fmt(*self._interaction(o.name, i, y))}"
                    for o in self.rnd.objectives
                    if o.weight > 0
                )
                best = (est, y, text)
        return None if best is None else (best[1], best[2])

    def _interaction(self, metric: str, i: int, y: int) -> tuple[float, float, float]:
        fit = self.fits[metric]
        e_p, d_p = fit.predict_delta({i, y})
        e_i, d_i = fit.predict_delta({i})
        e_y, d_y = fit.predict_delta({y})
        return _interval(e_p - e_i - e_y, d_p - d_i - d_y)

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
        out[UTILITY] = credit_with_intervals(self.util(self.fits), self.final, shelved)
        return out

    def credit_table(self, credit: Mapping[str, Mapping[int, Credit]]) -> list[dict[str, Any]]:
        """The one place authors appear: after every decision is made."""
        rows = []
        for i, c in enumerate(self.rnd.contributions):
            if not credit or i not in credit[UTILITY]:
                continue
            row: dict[str, Any] = {
                "id": c.id,
                "author": c.author,
                "status": "accepted" if i in self.final else "shelved",
            }
            for metric, table in credit.items():
                cr = table[i]
                row[metric] = {
                    "shapley": [cr.shapley.estimate, cr.shapley.low, cr.shapley.high],
                    "banzhaf": [cr.banzhaf.estimate, cr.banzhaf.low, cr.banzhaf.high],
                    "marginal": [cr.marginal.estimate, cr.marginal.low, cr.marginal.high],
                }
            rows.append(row)
        return rows


def _excludes_zero(draws: np.ndarray) -> bool:
    """The 95% interval shown beside a claim lies on one side of zero."""
    low, high = np.quantile(draws, [0.025, 0.975])
    return bool(low > 0 or high < 0)


def _estimable(fits: Mapping[str, EffectsFit], subset: Subset | set[int]) -> bool:
    return next(iter(fits.values())).estimable(subset)


def _interval(est: float, draws: np.ndarray) -> tuple[float, float, float]:
    low, high = np.quantile(draws, [0.025, 0.975])
    return float(est), float(low), float(high)


def _fmt(est: float, low: float, high: float) -> str:
    return f"{est:+.3g} [{low:+.3g}, {high:+.3g}]"


def _guard_text(g: Guardrail) -> str:
    if g.kind == "ratio":
        op = ">=" if g.direction == "max" else "<="
        return f"{op} {g.threshold:g} x baseline"
    worse, better = ("fall", "rise") if g.direction == "max" else ("rise", "fall")
    if g.threshold <= 0:
        return f"may {worse} at most {abs(g.threshold):g}"
    return f"must {better} at least {g.threshold:g}"


def _shared_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    keys = [
        k for k in a if k in b or any(k.startswith(o + ".") or o.startswith(k + ".") for o in b)
    ]
    return sorted(keys) or sorted(a)
