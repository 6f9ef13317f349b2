"""Rounds: one YAML file that says what an integration round decides, and how it may spend runs.

    name: spring-round              # optional; default: the file's name without .yaml
    baseline: tiny                  # a recipe file (relative to this file) or a built-in name
    contributions: [muon, my.yaml]  # built-in names, or files or folders relative to this file
    objectives:                     # names from the run's metrics.json (see below)
      - {metric: val_bpb, direction: min, weight: 1.0}
      - {metric: task_acc/arithmetic, direction: max, weight: 1.0, scale: 0.01}
    guardrails:                     # "must not get worse than this", checked per candidate
      - {metric: agent_success/calculator, kind: min_delta, threshold: -0.01}
      - {metric: pretrain/tokens_per_s, kind: ratio, threshold: 0.9}
    seeds: 3                        # or a list, e.g. [0, 1, 2]; every batch pairs by seed
    confirm_seeds: 3                # seeds of the confirmation batch (fresh ones if a count)
    budget: 120                     # the most distinct runs (recipe x seed) the round may use
    runner: {kind: builtin, timeout_s: 3600}    # `stacklab build` each run; or external (below)
    executor: {kind: local, workers: 2}     # or {kind: ray, address: "ray://head:10001"}
    store: postgresql://host/db      # optional; default: sqlite in the --out folder
    tracking: {trackers: [tensorboard, wandb]}  # optional; each run's metrics, by subset and seed
    scales:                         # optional: a ladder of rungs, smallest first (see below)
      - {name: s, patch: {model.depth: 2, pretrain.steps: 100}}
      - {name: m, patch: {model.depth: 4, pretrain.steps: 200}, cost: 4, share: 0.5}
    lr_tuning: {key: optim.lr, factors: [0.5, 1.0, 2.0], seeds: 2}   # optional, top rung

The metrics are those the runner writes to `{out}/metrics.json`. The built-in runner's are
`stacklab build`'s: `val_bpb`, `task_acc/<task>` and `agent_success/<env>` (of the recipe's
`data.tasks` and `eval.agent_envs`), `pretrain/tokens_per_s` and the other stage metrics.
Any trainer can be the runner instead, with metric names of its own:
`{kind: external, command: "python train.py {recipe} --seed {seed} --out {out}"}`.

With an external runner the baseline may be any YAML, JSON or TOML file (its dotted keys are
what patches set), and a round may name a git repository whose refs are contributions
(`git: REF` in a contribution file, instead of or beside `patch:`):

    repo: ../trainer                # a git repository, relative to this file
    base: main                      # the ref every subset starts from (default HEAD)
    baseline: train.toml            # with repo: a path inside the repository
    runner: {kind: external, command: "python train.py --config {recipe} --out {out}"}

A subset's code is `base` with its members' refs merged in, in the round's order; the command
runs in that tree (`{tree}`). Without a repository, `runner.depends` lists the files (globs
allowed) whose content names the trainer's code; by default the command's script and the
local modules it imports. A run is keyed by its code, its config and its seed.

How sure the decision must be (defaults): `level: 0.95` (every verdict's confidence: a
member is accepted when its gain inside the final recipe is significant at this level,
with the error spent over the confirmation's sequential looks), `min_effect` (the smallest
utility gain worth keeping; default half of one run's utility noise, measured on the
screening runs), and for the search, which only proposes: `confidence: 0.9` (stop when no
candidate beats the choice by more than `margin: 0.5` utility units with probability above
0.1), `guardrail_prob: 0.95` and `draws: 1000` (bootstrap). Utility is in units of one
run's noise unless objectives give a `scale`.

With `scales`, the budget is in cost units (a run at a rung of cost c uses c; the first
rung's cost defaults to 1, a larger rung's is measured from run times unless given) and
each rung's `share` of it defaults to a quarter for the first rung (raised to what its
screening needs) and equal parts of the rest for the others. The first rung runs the whole
round; each larger one measures the recipe the rung below chose, its leave-one-outs and the
close calls (ladder.py). A rung patch may not set a key any contribution sets. `lr_tuning`
(needs two rungs or more) runs the baseline and the chosen recipe at `factors` x the
baseline's `key` on `seeds` seeds of their own at the top rung, and compares each at its
best value there.

Everything is checked when the round is loaded (baseline, every contribution file, the
command template), so a typo fails in a second with the key and file named, not after an
hour of training.
"""

from __future__ import annotations

import itertools
import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stacklab import builtin
from stacklab.errors import StacklabError, describe_validation_error
from stacklab.integrate.configs import Baseline, FileBaseline, RecipeBaseline
from stacklab.integrate.contributions import (
    Contribution,
    ContributionError,
    blind_ids,
    components,
    conflicts,
    load_contributions,
)
from stacklab.integrate.gitrepo import GitError, Repo, check_git
from stacklab.integrate.select import Guardrail, Objective
from stacklab.integrate.workspace import Resolved, Workspace, WorkspaceError
from stacklab.recipe import Recipe, TrackerName, get_dotted, load_recipe

PLACEHOLDERS = ("recipe", "seed", "out", "tree")
FIRST_SHARE = 0.25  # default share of the budget for the first rung of a ladder


class RoundError(StacklabError):
    """The round file is invalid."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectiveSpec(_Spec):
    metric: str = Field(min_length=1)
    direction: Literal["max", "min"] = "max"
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    scale: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="unit in the utility; default: run noise"
    )


class GuardrailSpec(_Spec):
    metric: str = Field(min_length=1)
    kind: Literal["min_delta", "ratio"]
    threshold: float = Field(allow_inf_nan=False)
    direction: Literal["max", "min"] | None = Field(
        None, description="which way is better; default: the objective's, else max"
    )


class BuiltinRunner(_Spec):
    """`stacklab build` on each resolved recipe; stages are shared through the stage cache."""

    kind: Literal["builtin"]
    cache_dir: Path | None = Field(None, description="stage cache (default: stacklab's own)")
    timeout_s: float | None = Field(None, gt=0, description="per-run limit; None: no limit")
    attempts: int = Field(1, ge=1, description="tries per run before it counts as failed")


class ExternalRunner(_Spec):
    """Any trainer: a command that reads {recipe} and writes {out}/metrics.json."""

    kind: Literal["external"]
    command: str = Field(min_length=1)
    depends: list[str] | None = Field(
        None,
        min_length=1,
        description="files or globs (relative to the round file) whose content names the "
        "trainer's code; default: the command's script. Not with repo: (the tree names it)",
    )
    timeout_s: float | None = Field(None, gt=0, description="per-run limit; None: no limit")
    attempts: int = Field(1, ge=1, description="tries per run before it counts as failed")

    @field_validator("command")
    @classmethod
    def _template(cls, command: str) -> str:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ValueError(f"cannot split {command!r} into arguments: {exc}") from None
        dummy = {name: "x" for name in PLACEHOLDERS}
        for arg in argv:
            try:
                arg.format(**dummy)
            except KeyError as exc:
                raise ValueError(
                    f"unknown placeholder {{{exc.args[0]}}} in {arg!r}; "
                    "the placeholders are {recipe}, {seed}, {out} and {tree}"
                ) from None
            except (ValueError, IndexError) as exc:
                raise ValueError(
                    f"bad placeholder in {arg!r} ({exc}); write {{{{ for a brace"
                ) from None
        for needed in ("recipe", "out"):
            if not any("{" + needed + "}" in arg for arg in argv):
                raise ValueError(f"the command must pass {{{needed}}} to the trainer")
        return command


class LocalExecutor(_Spec):
    kind: Literal["local"]
    workers: int | None = Field(
        None, ge=1, description="runs at once; default: half the CPU cores, at least 1"
    )


class RayExecutor(_Spec):
    kind: Literal["ray"]
    address: str | None = Field(None, description="ray.init address; None: a local instance")
    cpus_per_run: float = Field(1.0, gt=0)


class TrackingSpec(_Spec):
    """Each finished run's metrics also logged to trackers, tagged by subset and seed."""

    trackers: list[TrackerName] = Field(min_length=1)
    project: str = Field("stacklab", min_length=1, description="the W&B and trackio project")
    dir: str | None = Field(
        None, min_length=1, description="relative to the round file; default: --out/tracking"
    )


class ScaleSpec(_Spec):
    """One rung of a scale ladder: a patch applied on top of the baseline and every subset."""

    name: str = Field(min_length=1, max_length=40)
    patch: dict[str, Any] = Field(min_length=1, description="dotted key of the baseline -> value")
    cost: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="price of one run in cost units; default: 1 for the first rung, measured "
        "from run times for the others",
    )  # fmt: skip
    share: float | None = Field(
        None, gt=0, le=1, description="fraction of the budget; default: a quarter for the "
        "first rung (at least what its screening needs), equal parts of the rest for the others",
    )  # fmt: skip


class LrTuningSpec(_Spec):
    """At the top rung, the baseline and the chosen recipe each at its best learning rate."""

    key: str = Field(min_length=1, description="the learning rate's dotted key")
    factors: list[float] = Field(
        min_length=2, description="multiples of the baseline's value at the top rung"
    )
    seeds: int = Field(2, ge=1, description="seeds of the grid (never used for a verdict)")

    @field_validator("factors")
    @classmethod
    def _factors(cls, value: list[float]) -> list[float]:
        if any(not (f > 0 and f < float("inf")) for f in value):
            raise ValueError("factors must be positive numbers")
        if len(set(value)) != len(value):
            raise ValueError(f"factors repeat: {value}")
        return value


RunnerSpec = Annotated[BuiltinRunner | ExternalRunner, Field(discriminator="kind")]
ExecutorSpec = Annotated[LocalExecutor | RayExecutor, Field(discriminator="kind")]


class RoundSpec(_Spec):
    """The round file as written (paths still relative to it)."""

    name: str | None = Field(None, min_length=1, max_length=200)
    repo: str | None = Field(
        None, min_length=1, description="a git repository (relative to the round file)"
    )
    base: str | None = Field(None, min_length=1, description="the ref subsets start from")
    baseline: str = Field(min_length=1)
    contributions: list[str] = Field(min_length=1)
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    guardrails: list[GuardrailSpec] = Field(default_factory=list)
    seeds: list[int] | int = 3
    confirm_seeds: list[int] | int = 3
    budget: int = Field(ge=1)
    runner: RunnerSpec
    executor: ExecutorSpec = Field(default_factory=lambda: LocalExecutor(kind="local"))
    store: str | None = Field(None, description="SQLAlchemy URL; default: sqlite in --out")
    confidence: float = Field(
        0.9, gt=0.5, lt=1, description="how sure the stop rule must be that nothing is better"
    )
    margin: float = Field(
        0.5, ge=0, description="utility differences below this are ties (stop rule)"
    )
    guardrail_prob: float = Field(0.95, gt=0, le=1, description="P(guardrails hold) required")
    level: float = Field(
        0.95, gt=0.5, lt=1, description="confidence of every verdict (alpha = 1 - level)"
    )
    min_effect: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="smallest utility gain worth keeping; default: half one run's utility noise",
    )
    draws: int = Field(1000, ge=100, le=20000, description="bootstrap draws per fit")
    tracking: TrackingSpec | None = Field(
        None, description="log each finished run to trackers; default: the store only"
    )
    scales: list[ScaleSpec] | None = Field(
        None, min_length=1, description="rungs of a scale ladder, smallest first"
    )
    lr_tuning: LrTuningSpec | None = Field(
        None, description="compare the baseline and the chosen recipe at their best lr"
    )

    @field_validator("contributions", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("seeds", "confirm_seeds")
    @classmethod
    def _seeds(cls, value: list[int] | int) -> list[int] | int:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("a seed count must be at least 1")
            return value
        if not value:
            raise ValueError("give at least one seed")
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        if min(value) < 0:
            raise ValueError("seeds must be >= 0")
        return value

    @model_validator(mode="after")
    def _code(self) -> RoundSpec:
        if self.base is not None and self.repo is None:
            raise ValueError("base: names a ref of repo:, and the round has no repo:")
        if self.repo is not None and not isinstance(self.runner, ExternalRunner):
            raise ValueError(
                "repo: needs runner kind 'external' (the built-in runner runs stacklab's code)"
            )
        if self.repo is not None and self.runner.depends is not None:
            raise ValueError(
                "runner.depends is for rounds without repo: (a git round's code is its tree)"
            )
        return self

    @model_validator(mode="after")
    def _ladder(self) -> RoundSpec:
        if self.scales is None:
            if self.lr_tuning is not None:
                raise ValueError("lr_tuning: needs scales: with two rungs or more")
            return self
        names = [s.name for s in self.scales]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"scales: rung name {dupes[0]!r} repeats")
        given = sum(s.share for s in self.scales if s.share is not None)
        if given > 1 + 1e-9:
            raise ValueError(f"scales: the shares add up to {given:g}, more than 1")
        if self.lr_tuning is not None and len(self.scales) < 2:
            raise ValueError("lr_tuning: needs two rungs or more (it runs at the top rung)")
        return self

    @model_validator(mode="after")
    def _metrics(self) -> RoundSpec:
        names = [o.metric for o in self.objectives]
        dupes = sorted({m for m in names if names.count(m) > 1})
        if dupes:
            raise ValueError(f"objectives name metric {dupes[0]!r} twice")
        if all(o.weight == 0 for o in self.objectives):
            raise ValueError("at least one objective needs a weight above 0")
        directions = {o.metric: o.direction for o in self.objectives}
        for g in self.guardrails:
            own = directions.get(g.metric)
            if g.direction is not None and own is not None and g.direction != own:
                raise ValueError(
                    f"guardrail on {g.metric!r} says direction {g.direction} but the objective "
                    f"says {own}"
                )
        return self


@dataclass(frozen=True)
class Rung:
    """One rung of a round's scale ladder, as the engine uses it."""

    name: str
    patch: dict[str, Any]
    cost: float | None  # None: measured from run times when the rung starts
    cost_source: str  # given | default | measured
    share: float  # of the budget (what a rung leaves unspent passes to the next)
    share_source: str = "given"  # given | default


@dataclass(frozen=True)
class Round:
    """A loaded, checked round: everything the engine needs, paths resolved."""

    file: Path
    name: str
    spec: RoundSpec
    baseline_path: Path
    baseline: Recipe | None  # the baseline recipe, when it is one (else see workspace)
    contributions: list[Contribution]  # index i in designs and fits is contributions[i]
    groups: list[list[int]]  # choice groups as indices
    exclusive: dict[frozenset[int], str]  # pairs never combined -> why ("both set optim.lr")
    workspace: Workspace  # subsets -> config, code and the hash naming both
    blind: dict[str, str]  # id -> blind id
    objectives: list[Objective]
    guardrails: list[Guardrail]
    seeds: list[int]
    confirm_count: int  # confirmation seeds, when given as a count
    confirm_list: list[int] | None  # confirmation seeds, when given as a list
    workers: int
    rungs: list[Rung] = field(default_factory=list)  # a scale ladder, smallest first; or none

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.contributions]

    def conflict(self, i: int, j: int) -> str:
        """Why contributions i and j are never combined (they may be only in one group)."""
        return self.exclusive.get(frozenset((i, j)), "they are in one choice group")

    @property
    def metrics(self) -> list[str]:
        """Every metric a run must report: objectives, then guarded metrics."""
        names = [o.name for o in self.objectives] + [g.metric for g in self.guardrails]
        return list(dict.fromkeys(names))


def load_round(path: str | Path, work: Path | None = None) -> Round:
    """Read, validate and resolve a round file; every error names the file and the key.

    `work` is the round's --out folder: a git round writes its merge objects under
    `work/git` and exports trees under `work/trees` (without it, a temporary folder).
    """
    file = builtin.resolve("round", path, error=RoundError)
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise RoundError(f"{file}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise RoundError(f"{file}: a round must be a mapping, got {type(raw).__name__}")
    try:
        spec = RoundSpec.model_validate(raw)
    except ValidationError as exc:
        raise RoundError(f"{file}: {describe_validation_error(exc, RoundSpec)}") from None

    here = file.parent
    if spec.repo is not None:
        workspace, baseline_path = _git_workspace(spec, here, file, work)
    else:
        workspace, baseline_path = _plain_workspace(spec, here, file)
    baseline = workspace.baseline
    try:
        paths = [
            builtin.resolve("contribution", entry, beside=here, error=ContributionError)
            for entry in spec.contributions
        ]
        contribs = load_contributions(paths, baseline)
    except ContributionError as exc:
        raise RoundError(f"{file}: contributions: {exc}") from None
    for c in contribs:
        if workspace.is_recipe and "seed" in c.patch:
            raise RoundError(
                f"{c.source}: patch sets 'seed'; seeds belong to the round ({file}: seeds)"
            )
    workspace.contributions = contribs
    _add_changes(workspace, contribs, spec, file)
    index = {c.id: i for i, c in enumerate(contribs)}
    exclusive = {
        frozenset((index[a], index[b])): f"both set {', '.join(keys)}"
        for (a, b), keys in conflicts(contribs).items()
    }
    exclusive |= _code_conflicts(workspace, contribs)
    groups = components(range(len(contribs)), [tuple(sorted(p)) for p in exclusive])
    _check_distinct(workspace, contribs, exclusive)
    rungs = _rungs(spec, workspace, contribs, file)

    directions = {o.metric: o.direction for o in spec.objectives}
    objectives = [Objective(o.metric, o.direction, o.weight, o.scale) for o in spec.objectives]
    guardrails = [
        Guardrail(g.metric, g.kind, g.threshold, g.direction or directions.get(g.metric, "max"))
        for g in spec.guardrails
    ]
    seeds = list(range(spec.seeds)) if isinstance(spec.seeds, int) else list(spec.seeds)
    confirm = spec.confirm_seeds
    workers = (
        spec.executor.workers or max(1, (os.cpu_count() or 2) // 2)
        if isinstance(spec.executor, LocalExecutor)
        else 1
    )
    return Round(
        file=file.resolve(),
        name=spec.name or file.stem,
        spec=spec,
        baseline_path=baseline_path,
        baseline=baseline.recipe if isinstance(baseline, RecipeBaseline) else None,
        contributions=contribs,
        groups=groups,
        exclusive=exclusive,
        workspace=workspace,
        blind=blind_ids(contribs),
        objectives=objectives,
        guardrails=guardrails,
        seeds=seeds,
        confirm_count=confirm if isinstance(confirm, int) else len(confirm),
        confirm_list=None if isinstance(confirm, int) else list(confirm),
        workers=workers,
        rungs=rungs,
    )


def _rungs(
    spec: RoundSpec, workspace: Workspace, contribs: list[Contribution], file: Path
) -> list[Rung]:
    """The ladder's rungs, checked: every rung patch applies to the baseline, sets no key a
    contribution sets (it would overwrite the contribution at that rung), and the lr key of
    `lr_tuning` is a positive number at the top rung."""
    if spec.scales is None:
        return []
    given = sum(s.share for s in spec.scales if s.share is not None)
    free = [k for k, s in enumerate(spec.scales) if s.share is None]
    shares = [s.share for s in spec.scales]
    if free and free[0] == 0 and len(spec.scales) > 1:
        shares[0] = min(FIRST_SHARE, 1.0 - given)
        free = free[1:]
        given += shares[0]
    for k in free:
        shares[k] = max(0.0, 1.0 - given) / len(free)
    rungs = []
    for k, s in enumerate(spec.scales):
        where = f"{file}: scales[{k}] ({s.name})"
        for c in contribs:
            clash = [
                (a, b)
                for a in s.patch
                for b in c.patch
                if a == b or a.startswith(b + ".") or b.startswith(a + ".")
            ]
            if clash:
                a, b = clash[0]
                raise RoundError(
                    f"{where}: patch key {a!r} overlaps {b!r}, which {c.source} sets; a rung "
                    "would overwrite the contribution: change the rung or the contribution"
                )
        try:
            resolved = workspace.resolve(frozenset(), s.patch, {"rung": s.name})
        except WorkspaceError as exc:
            raise RoundError(f"{where}: patch: {exc.detail}") from None
        if shares[k] is None or shares[k] <= 0:  # type: ignore[operator]
            raise RoundError(f"{where}: no share of the budget is left for this rung")
        cost, source = s.cost, "given"
        if cost is None:
            cost, source = (1.0, "default") if k == 0 else (None, "measured")
        rungs.append(
            Rung(
                s.name, dict(s.patch), cost, source, float(shares[k]),  # type: ignore[arg-type]
                "given" if s.share is not None else "default",
            )
        )  # fmt: skip
        if spec.lr_tuning is not None and k == len(spec.scales) - 1:
            key = spec.lr_tuning.key
            try:
                value = get_dotted(resolved.data, key)
            except (KeyError, IndexError, TypeError, ValueError):
                raise RoundError(
                    f"{file}: lr_tuning.key: {key!r} is not a key of the baseline at rung {s.name}"
                ) from None
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise RoundError(
                    f"{file}: lr_tuning.key: {key} is {value!r} at rung {s.name}; it must be a "
                    "positive number"
                )
    return rungs


def _check_distinct(
    workspace: Workspace, contribs: list[Contribution], exclusive: dict[frozenset[int], str]
) -> None:
    """Every contribution must change the config or the code, and no two may make each other
    redundant.

    Otherwise two different subsets are one run: the runs could not tell them apart, and
    the content-addressed store would hand one subset's run to the other.
    """
    base = _resolve(workspace, frozenset(), None).run_hash
    alone = [_resolve(workspace, frozenset({i}), c).run_hash for i, c in enumerate(contribs)]
    for c, h in zip(contribs, alone, strict=True):
        if h == base:
            what = "the patch changes" if not c.git else "its code and patch change"
            raise RoundError(f"{c.source}: {what} nothing in the baseline")
    for i, j in itertools.combinations(range(len(contribs)), 2):
        if frozenset((i, j)) in exclusive:
            continue
        a, b = contribs[i], contribs[j]
        try:
            both = workspace.resolve(frozenset((i, j))).run_hash
        except WorkspaceError as exc:
            raise RoundError(
                f"{a.source} and {b.source} cannot be combined: {exc.detail}"
            ) from None
        if both in (alone[i], alone[j]):
            raise RoundError(
                f"{a.source} and {b.source}: one's change is part of the other's; merge them or "
                "split the shared setting into its own contribution"
            )


def _resolve(workspace: Workspace, subset: frozenset[int], c: Contribution | None) -> Resolved:
    try:
        return workspace.resolve(subset)
    except WorkspaceError as exc:
        where = c.source if c is not None else "baseline"
        raise RoundError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- baselines, code


def _plain_workspace(spec: RoundSpec, here: Path, file: Path) -> tuple[Workspace, Path]:
    """A round without a repository: a recipe (built-in runner, or a recipe file given to an
    external one) or any YAML/JSON/TOML file (external runner)."""
    runner = spec.runner
    external = isinstance(runner, ExternalRunner)
    if (
        external
        and Path(spec.baseline).suffix in (".toml", ".json")
        and not (here / spec.baseline).is_file()
    ):
        raise RoundError(f"{file}: baseline: no file {here / spec.baseline}")
    path = _baseline_path(spec.baseline, here, file)
    baseline: Baseline
    recipe = load_recipe(path) if not external else _as_recipe(path)
    if recipe is not None:
        baseline = RecipeBaseline(recipe)
    else:
        try:
            baseline = FileBaseline.load(path)
        except StacklabError as exc:
            raise RoundError(f"{file}: baseline: {exc}") from None
    command = shlex.split(runner.command) if isinstance(runner, ExternalRunner) else None
    depends = runner.depends if isinstance(runner, ExternalRunner) else None
    workspace = Workspace(
        baseline=baseline,
        contributions=[],
        is_recipe=isinstance(baseline, RecipeBaseline),
        command=command,
        root=here.resolve(),
        depends=depends,
    )
    try:
        workspace.resolve(frozenset())  # the trainer's files exist and can be hashed
    except StacklabError as exc:
        raise RoundError(f"{file}: runner: {exc}") from None
    return workspace, path


_RECIPE_SECTIONS = {"base", "name", "data", "model", "optim", "pretrain", "sft", "rl", "eval"}


def _as_recipe(path: Path) -> Recipe | None:
    """An external runner's baseline as a stacklab recipe, or None for another config: a
    YAML file is a recipe when it validates as one, or when it uses a recipe's sections (then
    its errors are the recipe's, raised here)."""
    if path.suffix not in (".yaml", ".yml"):
        return None
    try:
        return load_recipe(path)
    except StacklabError:
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return None
        if isinstance(raw, dict) and _RECIPE_SECTIONS & set(raw):
            raise
        return None


def _git_workspace(
    spec: RoundSpec, here: Path, file: Path, work: Path | None
) -> tuple[Workspace, Path]:
    """A round over a git repository: the baseline file is read from the base's tree."""
    assert spec.repo is not None and isinstance(spec.runner, ExternalRunner)
    try:
        check_git()
    except GitError as exc:
        raise RoundError(f"{file}: repo: {exc}") from None
    repo_path = (here / spec.repo).resolve()
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="stacklab-round-"))
    try:
        repo = Repo(repo_path, work / "git", name=spec.repo)
    except GitError as exc:
        raise RoundError(f"{file}: repo: {exc}") from None
    base_ref = spec.base or "HEAD"
    try:
        base = repo.resolve(base_ref)
    except GitError as exc:
        raise RoundError(f"{file}: base: {exc}") from None
    dirty = repo.uncommitted_at(base)
    if dirty:
        shown = ", ".join(dirty[:3]) + (f" and {len(dirty) - 3} more" if len(dirty) > 3 else "")
        raise RoundError(
            f"{file}: base: {repo_path} has uncommitted changes at {base_ref} ({shown}); "
            "a round runs committed code only: commit or stash them"
        )
    text = repo.read(repo.tree(base), spec.baseline)
    if text is None:
        raise RoundError(f"{file}: baseline: no file {spec.baseline} in {repo_path} at {base_ref}")
    try:
        baseline = FileBaseline.load(Path(spec.baseline), text)
    except StacklabError as exc:
        raise RoundError(f"{file}: baseline: {exc}") from None
    workspace = Workspace(
        baseline=baseline,
        contributions=[],
        is_recipe=False,
        command=shlex.split(spec.runner.command),
        root=here.resolve(),
        repo=repo,
        base=base,
        baseline_path=spec.baseline,
        work=work,
    )
    return workspace, repo_path / spec.baseline


def _add_changes(
    workspace: Workspace, contribs: list[Contribution], spec: RoundSpec, file: Path
) -> None:
    """Each `git:` contribution's change, checked to exist and to apply to the base alone."""
    repo, base = workspace.repo, workspace.base
    for i, c in enumerate(contribs):
        if c.git is None:
            continue
        if repo is None or base is None:
            raise RoundError(f"{c.source}: git: {c.git!r} needs a repo: in the round ({file})")
        try:
            change = repo.change(base, c.git)
            if not change.files:
                raise RoundError(
                    f"{c.source}: git: {c.git} changes nothing relative to {spec.base or 'HEAD'}"
                )
            repo.can_apply(base, change)
        except GitError as exc:
            raise RoundError(f"{c.source}: git: {exc}") from None
        workspace.changes[i] = change


def _code_conflicts(
    workspace: Workspace, contribs: list[Contribution]
) -> dict[frozenset[int], str]:
    """Pairs of code changes that conflict textually: never combined, and why."""
    repo, base = workspace.repo, workspace.base
    found: dict[frozenset[int], str] = {}
    if repo is None or base is None:
        return found
    for i, j in itertools.combinations(sorted(workspace.changes), 2):
        conflict = repo.conflict(base, workspace.changes[i], workspace.changes[j])
        if conflict is not None:
            found[frozenset((i, j))] = conflict.describe()
    return found


def _baseline_path(baseline: str, here: Path, file: Path) -> Path:
    """A file beside the round first, then a built-in recipe name."""
    try:
        return builtin.resolve("recipe", baseline, beside=here).resolve()
    except StacklabError as exc:
        raise RoundError(f"{file}: baseline: {exc}") from None
