"""Experiment tracking: metrics also sent to TensorBoard, W&B (offline) or trackio.

Every stage writes `metrics.jsonl`, and that file stays the record: trackers only show it
elsewhere. The recipe's `log.trackers` turns them on for a build's stages (`recipe_tracker`,
opened by `MetricsLog`), a round file's `tracking.trackers` for an integration round's runs
(`RoundTracker`). Each is an optional extra: `pip install 'stacklab[track]'`. Why it works
this way:

* **A missing package fails at once, in one line** that names the key and the extra, before
  the first step and on every rank (a rank stopping alone would leave the others waiting in
  a collective).
* **A tracker never stops training.** A backend that raises (a full disk, a broken install)
  is warned about once (`TrackingWarning`) and switched off; the others and metrics.jsonl
  carry on.
* **Nothing leaves the machine.** W&B runs in offline mode (`wandb sync` uploads a run
  folder later), trackio writes its local database, TensorBoard writes event files.
* **A tracker changes no result.** The recipe's `log` section is outside its hash and every
  stage's cache key, so turning one on retrains nothing (and a cached stage logs nothing).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stacklab.errors import StacklabError

if TYPE_CHECKING:
    from stacklab.recipe import Recipe

# tracker name -> the module it needs
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
EXTRA = "pip install 'stacklab[track]'"


class TrackingWarning(RuntimeWarning):
    """A tracker failed and is off for the rest of its run; metrics.jsonl is unaffected."""


class Tracker:
    """Where metrics go besides metrics.jsonl. This base sends them nowhere."""

    def log(self, metrics: Mapping[str, Any], step: int, stage: str) -> None:
        """Record `metrics` (numbers; other values and `step` are skipped) at `step`, each
        named `stage/key` (`key` alone when `stage` is empty)."""

    def close(self) -> None:
        """Flush and finish; the tracker is not used again."""


NULL = Tracker()


def require(names: Sequence[str], where: str) -> None:
    """Raise the one-line error for the first tracker whose package is not installed;
    `where` names the setting, e.g. "recipe key log.trackers"."""
    for name in names:
        if name not in MODULES:
            raise StacklabError(f"{where}: unknown tracker {name!r}; valid: {', '.join(MODULES)}")
        if importlib.util.find_spec(MODULES[name]) is None:
            raise StacklabError(f"{where}: {name!r} needs {EXTRA}")


def scalars(metrics: Mapping[str, Any], stage: str) -> dict[str, float]:
    """The numeric values of `metrics` (but `step`), named `stage/key`."""
    return {
        f"{stage}/{key}" if stage else key: float(value)
        for key, value in metrics.items()
        if key != "step" and isinstance(value, int | float)
    }


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class RunInfo:
    """What names one tracker run, the same for every backend (each uses what it knows)."""

    project: str
    name: str
    group: str | None
    job_type: str
    tags: tuple[str, ...] = ()
    resume_step: int = 0  # > 0: the run continues from a checkpoint at this step


class TensorBoardTracker(Tracker):
    """Event files in `log_dir` (torch's SummaryWriter); `config` as a text summary."""

    def __init__(self, log_dir: Path, config: Mapping[str, Any], run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events a killed run wrote after its last checkpoint are dropped.
        purge = run.resume_step + 1 if run.resume_step > 0 else None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)
        if run.resume_step == 0 and config:
            text = json.dumps(dict(config), indent=1, sort_keys=True, default=str)
            self.writer.add_text("config", f"```\n{text}\n```", 0)

    def log(self, metrics: Mapping[str, Any], step: int, stage: str) -> None:
        for tag, value in scalars(metrics, stage).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run in offline mode: a folder `dir/wandb/offline-run-*` (`wandb sync` uploads it)."""

    def __init__(self, log_dir: Path, config: Mapping[str, Any], run: RunInfo) -> None:
        import wandb

        log_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            silent=True, console="off", x_disable_stats=True, disable_git=True, save_code=False
        )
        self.run = wandb.init(
            project=run.project,
            dir=str(log_dir),
            mode="offline",
            name=run.name,
            group=run.group,
            job_type=run.job_type,
            tags=[t[:64] for t in run.tags],  # W&B's limit on a tag
            config=dict(config),
            reinit="create_new",
            settings=settings,
        )

    def log(self, metrics: Mapping[str, Any], step: int, stage: str) -> None:
        values = scalars(metrics, stage)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker(Tracker):
    """A trackio run in its local database ($TRACKIO_DIR; `trackio show --project P`)."""

    def __init__(self, log_dir: Path, config: Mapping[str, Any], run: RunInfo) -> None:
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a banner per run
            self.run = trackio.init(
                project=run.project,
                name=run.name,
                group=run.group,
                config=dict(config),
                resume="allow" if run.resume_step > 0 else "never",
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            )

    def log(self, metrics: Mapping[str, Any], step: int, stage: str) -> None:
        values = {k: v for k, v in scalars(metrics, stage).items() if math.isfinite(v)}
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()
        with contextlib.suppress(Exception):  # else its atexit hook finishes it again
            from trackio import context_vars

            if context_vars.current_run.get() is self.run:
                context_vars.current_run.set(None)


BACKENDS: dict[str, Callable[..., Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "trackio": TrackioTracker,
}


class FanOut(Tracker):
    """Every backend in turn; one that raises is warned about once and dropped."""

    def __init__(self, backends: Mapping[str, Tracker], failed: set[str] | None = None) -> None:
        self.backends = dict(backends)
        self.failed = failed if failed is not None else set()

    def log(self, metrics: Mapping[str, Any], step: int, stage: str) -> None:
        for name, backend in list(self.backends.items()):
            try:
                backend.log(metrics, step, stage)
            except Exception as exc:
                self._drop(name, exc)
                with contextlib.suppress(Exception):
                    backend.close()

    def close(self) -> None:
        for name, backend in list(self.backends.items()):
            try:
                backend.close()
            except Exception as exc:
                self._drop(name, exc)
        self.backends.clear()

    def _drop(self, name: str, exc: Exception) -> None:
        self.backends.pop(name, None)
        _warn(name, exc, self.failed)


def _warn(name: str, exc: BaseException, failed: set[str]) -> None:
    if name not in failed:
        failed.add(name)
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        warnings.warn(
            f"tracker {name!r} failed ({detail}); it is off from here, metrics.jsonl is "
            "still written",
            TrackingWarning,
            stacklevel=3,
        )


def open_tracker(
    names: Sequence[str],
    log_dir: Path,
    *,
    where: str,
    project: str,
    name: str,
    group: str | None = None,
    job_type: str = "train",
    config: Mapping[str, Any] | None = None,
    tags: Sequence[str] = (),
    resume_step: int = 0,
    failed: set[str] | None = None,
) -> Tracker:
    """A tracker sending to every backend of `names`, files under `log_dir`.

    A package that is missing raises the one-line error naming `where`; a backend that fails
    to start is warned about once and left out, like one that fails later. Backends named in
    `failed` (shared by the caller across runs) are skipped; new failures are added to it.
    """
    require(names, where)
    failed = failed if failed is not None else set()
    run = RunInfo(project, name, group, job_type, tuple(tags), resume_step)
    backends: dict[str, Tracker] = {}
    for backend in names:
        if backend in failed:
            continue
        folder = log_dir / "tensorboard" if backend == "tensorboard" else log_dir
        try:
            backends[backend] = BACKENDS[backend](folder, config or {}, run)
        except ImportError as exc:
            raise StacklabError(
                f"{where}: {backend!r} needs {EXTRA} (import failed: {' '.join(str(exc).split())})"
            ) from None
        except Exception as exc:
            _warn(backend, exc, failed)
    return FanOut(backends, failed) if backends else NULL


# --------------------------------------------------------------------------- stages and rounds


def recipe_tracker(recipe: Recipe, work_dir: Path, stage: str, resume_step: int = 0) -> Tracker:
    """The tracker of one stage of `recipe`'s build (nothing when `log.trackers` is empty).

    Files go to the stage's folder `work_dir` (TensorBoard under `tensorboard/`, W&B under
    `wandb/`), or with `log.dir` to `dir/<name>-<hash>/<stage>`. One tracker run per stage,
    grouped by recipe, with the whole recipe as its config.
    """
    cfg = recipe.log
    if not cfg.trackers:
        return NULL
    ident = f"{recipe.name}-{recipe.hash()[:8]}"
    root = Path(cfg.dir) / ident / stage if cfg.dir is not None else Path(work_dir)
    config = {"stage": stage, "recipe_hash": recipe.hash(), **recipe.to_dict()}
    return open_tracker(
        cfg.trackers,
        root,
        where="recipe key log.trackers",
        project=cfg.project,
        name=f"{ident}/{stage}",
        group=ident,
        job_type=stage,
        config=config,
        resume_step=resume_step,
    )


class RoundTracker:
    """Each finished run of an integration round as a tracker run of its own: its final
    metrics (metrics.json), with config and tags round, subset, seed and run key.

    Subsets are named by blind ids, as in the store while the round runs. Files go to
    `root/<round>/<subset>/seed<seed>-<key>`; a backend that fails is off for the round.
    """

    WHERE = "round key tracking.trackers"

    def __init__(self, names: Sequence[str], root: Path, project: str, round_name: str) -> None:
        require(names, self.WHERE)
        self.names = list(names)
        self.root = Path(root) / round_name.replace("/", "_")
        self.project = project
        self.round = round_name
        self.failed: set[str] = set()

    def log_run(
        self, key: str, seed: int, subset: Sequence[str], metrics: Mapping[str, Any], step: int = 0
    ) -> None:
        """Log one run; `step` is its batch in the round. Never raises for a tracker."""
        label = "+".join(sorted(subset)) or "baseline"
        config = {"round": self.round, "subset": sorted(subset), "seed": seed, "run_key": key}
        try:
            tracker = open_tracker(
                [n for n in self.names if n not in self.failed],
                self.root / label / f"seed{seed}-{key[:8]}",
                where=self.WHERE,
                project=self.project,
                name=f"{label} seed {seed}",
                group=self.round,
                job_type="integration",
                config=config,
                tags=[f"seed:{seed}", *(sorted(subset) or ["baseline"])],
                failed=self.failed,
            )
            tracker.log(metrics, step, "")
            tracker.close()
        except Exception as exc:  # e.g. a package broken since the round started
            for name in self.names:
                _warn(name, exc, self.failed)
