"""decision.json as types: what a round decided, and the evidence behind every verdict.

Why typed: decision.json is the engine's contract with people and programs (DESIGN.md), and
the report, the command line, the benchmarks and the tests all read it. As a dict literal its
shape lived only in the code that built it, and every reader restated it in string keys. As
pydantic models the shape is written once: the engine fills a `DecisionRecord`, the readers use
its attributes, `DecisionRecord.model_json_schema()` is the published schema
(docs/decision.schema.json, kept equal to the models by a test), and a decision.json on disk
is read back and checked with `DecisionRecord.model_validate_json`.

`DecisionRecord.dumps()` is exactly the file the engine writes. Keys keep the order of the
fields; a field that only some rounds have (a ladder, a rung's learning rate, a git round's
code changes) is left out of the file when it is None, so a round without it writes the same
file as before it existed. Intervals are [estimate, low, high]; JSON has no infinity, so an
unbounded end (no noise estimate yet) is null, as is an estimate with no runs behind it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from stacklab.integrate.contributions import Area
from stacklab.integrate.verdicts import Verdict

if TYPE_CHECKING:
    from stacklab.integrate.credit import Credit
    from stacklab.integrate.credit import Interval as CreditInterval
    from stacklab.integrate.decide import Confirmation
    from stacklab.integrate.engine import RunBatch
    from stacklab.integrate.round import Round
    from stacklab.integrate.select import Guardrail, Objective
    from stacklab.integrate.store import Run

Estimate = tuple[float | None, float | None, float | None]  # [estimate, low, high]
Status = Literal["accepted", "shelved", "undecided"]
Kind = Literal[
    "accepted",
    "undecided",
    "failed",
    "conflict",
    "guardrail",
    "too_small",
    "vanishes",
    "no_gain",
    "not_selected",
    "lr_only",
    "no_transfer",
]
GuardState = Literal["held", "breached", "open"]
Purpose = Literal["screening", "adaptive", "confirmation", "interaction", "lr-grid", "probe"]
Pattern = Literal["holds", "flips", "fades", "emerges", "changes", "undecided", "one rung"]


def finite(values: Iterable[float]) -> list[float | None]:
    """JSON has no infinity: an unbounded end (or a NaN) is written as null."""
    return [float(v) if math.isfinite(v) else None for v in values]


def _is_none(value: object) -> bool:
    return value is None


def _optional() -> Any:
    """A field that some rounds lack: None, and then left out of decision.json."""
    return Field(default=None, exclude_if=_is_none)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- evidence


class ComparisonEvidence(_Record):
    """A direct seed-paired comparison: recipe a minus recipe b, per metric and in utility.

    loo: the final recipe minus it without the member; added: the final recipe with the
    contribution minus without it; swap: it in place of its choice-group rival; alone: it
    alone minus the baseline, on the screening seeds.
    """

    comparison: Literal["loo", "added", "swap", "alone"]
    a: list[str]
    b: list[str]
    seeds: list[int]
    level: float
    verdict: Verdict
    utility: Estimate
    metrics: dict[str, Estimate]


class InteractionEvidence(_Record):
    """A measured interaction: y(i+j) - y(i) - y(j) + y(baseline) on the screening seeds."""

    comparison: Literal["interaction"]
    pair: list[str]
    seeds: list[int]
    level: float
    verdict: Verdict
    utility: Estimate
    metrics: dict[str, Estimate]


EvidenceItem = Annotated[
    ComparisonEvidence | InteractionEvidence, Field(discriminator="comparison")
]


class _AtRung(_Record):
    rung: str


class RungComparison(ComparisonEvidence, _AtRung):
    """A contribution's comparison at one rung of a ladder (`rung` first)."""


class Transfer(_Record):
    """How a contribution's effect moved across the rungs it was measured at."""

    rungs: list[RungComparison]
    sign_changed: bool
    significance_changed: bool
    pattern: Pattern


class Decision(_Record):
    """One contribution's verdict, its reason in words and the comparisons behind it."""

    id: str
    blind_id: str
    area: Area
    summary: str
    status: Status
    kind: Kind
    reason: str
    evidence: list[EvidenceItem]
    rung: str | None = _optional()  # a ladder: the rung the verdict was drawn at
    transfer: Transfer | None = _optional()  # a ladder: the effect at every rung


# --------------------------------------------------------------------------- credit


class CreditValues(_Record):
    """One contribution's credit for one metric (or the utility), with 95% intervals."""

    shapley: tuple[float, float, float]
    banzhaf: tuple[float, float, float]
    marginal: tuple[float, float, float]

    @classmethod
    def of(cls, c: Credit) -> CreditValues:
        def triple(iv: CreditInterval) -> tuple[float, float, float]:
            return (iv.estimate, iv.low, iv.high)

        return cls(
            shapley=triple(c.shapley), banzhaf=triple(c.banzhaf), marginal=triple(c.marginal)
        )


class CreditRow(_Record):
    """A row of the credit table, the one place authors appear; then one entry per metric
    and the utility (keys beside id, author and status, as decision.json has them)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    author: str
    status: Literal["accepted", "shelved"]
    __pydantic_extra__: dict[str, CreditValues] = Field(init=False)

    @property
    def metrics(self) -> dict[str, CreditValues]:
        """metric (or "utility") -> credit."""
        return dict(self.__pydantic_extra__)


# --------------------------------------------------------------------------- the round


class RunCounts(_Record):
    """Training runs of the round: executed now, reused from the store, failed, stale."""

    executed: int
    reused: int
    failed: int
    total: int
    budget: int
    stale: int

    @classmethod
    def of(cls, runs: Iterable[Run], round_name: str, budget: int, stale: int) -> RunCounts:
        runs = list(runs)
        return cls(
            executed=sum(r.status == "done" and r.round == round_name for r in runs),
            reused=sum(r.status == "done" and r.round != round_name for r in runs),
            failed=sum(r.status == "failed" for r in runs),
            total=len(runs),
            budget=budget,
            stale=stale,
        )


class FilesCode(_Record):
    """The fingerprint every run shares: the built-in runner's or an external trainer's."""

    code: str
    kind: Literal["stacklab", "files"]
    files: dict[str, str]  # path (or <command>, <stacklab>) -> content hash
    covers: str


class GitCode(_Record):
    """The base tree of a git round."""

    code: str
    kind: Literal["git"]
    tree: str
    base: str | None
    refs: dict[str, str]


class CodeBase(_Record):
    ref: str
    commit: str | None


class CodeChange(_Record):
    """One contribution's code change in a git round."""

    ref: str
    commit: str
    merge_base: str
    files: list[str]
    insertions: int
    deletions: int
    diffstat: str


class CodeSummary(_Record):
    """What code the runs ran: the baseline's, and in a git round each contribution's change."""

    baseline: Annotated[FilesCode | GitCode, Field(discriminator="kind")]
    repo: str | None = _optional()
    base: CodeBase | None = _optional()
    changes: dict[str, CodeChange] | None = _optional()

    @classmethod
    def of(cls, rnd: Round) -> CodeSummary:
        ws = rnd.workspace
        base = ws.resolve(frozenset())
        baseline = {"code": base.code, **base.provenance}
        if ws.repo is None:
            return cls.model_validate({"baseline": baseline})
        changes = {
            rnd.ids[i]: CodeChange(
                ref=ch.ref,
                commit=ch.commit,
                merge_base=ch.merge_base,
                files=list(ch.files),
                insertions=ch.insertions,
                deletions=ch.deletions,
                diffstat=ch.diffstat,
            )
            for i, ch in sorted(ws.changes.items())
        }
        return cls.model_validate(
            {
                "baseline": baseline,
                "repo": str(ws.repo.path),
                "base": CodeBase(ref=rnd.spec.base or "HEAD", commit=ws.base),
                "changes": changes,
            }
        )


class ObjectiveRecord(_Record):
    """An objective as the round file gives it (`scale` None: one run's noise)."""

    metric: str
    direction: Literal["max", "min"]
    weight: float
    scale: float | None

    @classmethod
    def of(cls, o: Objective) -> ObjectiveRecord:
        return cls(metric=o.name, direction=o.direction, weight=o.weight, scale=o.scale)


class GuardrailRecord(_Record):
    """A guardrail as the round file gives it."""

    metric: str
    kind: Literal["min_delta", "ratio"]
    threshold: float
    direction: Literal["max", "min"]

    @classmethod
    def of(cls, g: Guardrail) -> GuardrailRecord:
        return cls(metric=g.metric, kind=g.kind, threshold=g.threshold, direction=g.direction)


class GuardrailCheck(_Record):
    """A guardrail judged on the final recipe against the baseline: the margin's interval
    (>= 0 where it holds) and, in words, what the runs rule out."""

    metric: str
    state: GuardState
    margin: Estimate
    level: float
    seeds: list[int]
    text: str


class Power(_Record):
    """What the confirmation can resolve: the gain it detects with 80% power."""

    max_seeds: int
    detectable_gain: float | None


class Attempt(_Record):
    """One round of comparisons around one final recipe."""

    recipe: list[str]
    verdicts: dict[str, Verdict]
    guardrails: dict[str, GuardState]


class ConfirmationRecord(_Record):
    """The sequential confirmation: its plan, the seeds it used and each attempt."""

    chosen: list[str]
    final: list[str]
    seeds: list[int]
    looks: int
    block: int
    alpha: float
    levels: list[float]
    attempts: list[Attempt]
    out_of_budget: bool
    reserve: int

    @classmethod
    def of(
        cls, conf: Confirmation, chosen: Iterable[int], ids: Sequence[str], reserve: int
    ) -> ConfirmationRecord:
        plan = conf.plan
        return cls(
            chosen=[ids[i] for i in sorted(chosen)],
            final=[ids[i] for i in sorted(conf.final)],
            seeds=[s for b in conf.blocks for s in b],
            looks=plan.looks,
            block=plan.block,
            alpha=plan.alpha,
            levels=[plan.level_at(k) for k in range(1, plan.looks + 1)],
            attempts=[
                Attempt(
                    recipe=[ids[i] for i in a.recipe],
                    verdicts={ids[m]: v for m, v in a.comparisons.items()},
                    guardrails=dict(a.guardrails),
                )
                for a in conf.attempts
            ],
            out_of_budget=conf.out_of_budget,
            reserve=reserve,
        )


class BatchRecord(_Record):
    """One batch of the plan: recipes x seeds (at a rung, and a learning rate, in a ladder)."""

    batch: int
    purpose: Purpose
    recipes: int
    seeds: list[int]
    rung: str | None = _optional()
    lr: float | None = _optional()  # only with a rung: the learning rate of a grid batch

    @classmethod
    def of(cls, b: RunBatch) -> BatchRecord:
        lr = b.lr if b.rung is not None else None
        return cls(
            batch=b.number, purpose=b.purpose, recipes=len(b.subsets), seeds=b.seeds,
            rung=b.rung, lr=lr,
        )  # fmt: skip


# --------------------------------------------------------------------------- a ladder


class RungRecord(_Record):
    """One rung of a scale ladder: its price, its budget, what it used and chose."""

    name: str
    patch: dict[str, JsonValue]
    cost: float
    cost_source: Literal["given", "default", "measured"]
    share: float
    budget_units: float
    budget_runs: int
    runs: int
    units_used: float
    noise_floor: float | None
    chosen: list[str]
    final: list[str]
    close_calls: list[str]
    out_of_budget: bool
    note: str | None


class Agreement(_Record):
    """Two neighbouring rungs: Kendall's tau between their recipes' mean utilities, and how
    many of the lower rung's decided verdicts the upper one confirmed."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, serialize_by_alias=True, validate_by_name=True
    )

    from_: str = Field(alias="from")
    to: str
    subsets: int
    kendall_tau: Estimate | None
    verdicts_compared: int
    verdicts_confirmed: int


class LrCurve(_Record):
    """Mean utility at each learning rate tried, and the best one."""

    best: float
    utility: list[tuple[float, float | None]]


class LrTuning(_Record):
    """The learning-rate grid of the top rung, on seeds of its own."""

    key: str
    rung: str | None
    values: list[float]
    seeds: list[int]
    recipe: list[str]
    baseline: LrCurve
    final: LrCurve


class LadderRecord(_Record):
    """A scale ladder: the budget in cost units, each rung, their agreement, the lr grid."""

    budget_units: int
    units_used: float
    rungs: list[RungRecord]
    agreement: list[Agreement]
    lr_tuning: LrTuning | None


# --------------------------------------------------------------------------- the record


class DecisionRecord(_Record):
    """decision.json: what the round decided, and why.

    `selected`, `shelved`, `undecided`, `credit` and `runs` are the contract of DESIGN.md;
    `decisions` holds every verdict with its evidence; the rest is the plan and the numbers
    the verdicts were drawn with (units, noise, power, the confirmation, the batches).
    """

    round: str
    round_file: str
    baseline: str
    selected: list[str]
    shelved: dict[str, str]  # id -> reason
    undecided: dict[str, str]  # id -> reason
    decisions: list[Decision]
    credit: dict[str, dict[str, float]]  # id -> metric (or "utility") -> Shapley value
    credit_table: list[CreditRow]
    runs: RunCounts
    stale: dict[str, int]  # why stored runs were set aside -> how many
    code: CodeSummary
    predicted: dict[str, Estimate]  # the selected recipe vs the baseline, per metric
    objectives: list[ObjectiveRecord]
    scales: dict[str, float]  # each objective's unit in the utility
    min_effect: float
    level: float
    noise_floor: dict[str, float | None]  # sd of one run after the seed effect
    power: Power
    guardrails: list[GuardrailRecord]
    guardrail_checks: list[GuardrailCheck]
    confirmation: ConfirmationRecord
    pareto: list[list[str]]
    stopped: Literal["confident", "budget", "batch limit"]
    batches: list[BatchRecord]
    notes: list[str]
    ladder: LadderRecord | None = _optional()

    def dumps(self) -> str:
        """The text of decision.json."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    def decision(self, cid: str) -> Decision:
        """The decision on contribution `cid`."""
        for d in self.decisions:
            if d.id == cid:
                return d
        raise KeyError(cid)


def schema_text() -> str:
    """The text of docs/decision.schema.json."""
    return json.dumps(DecisionRecord.model_json_schema(), indent=2) + "\n"


if __name__ == "__main__":  # python -m stacklab.integrate.record > docs/decision.schema.json
    print(schema_text(), end="")
