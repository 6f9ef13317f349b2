"""The build pipeline and its content-addressed stage cache.

A build is a chain of stages (corpus → tokenizer → shards → …). Each stage is a pure function
of the recipe settings it reads and of its input stages' outputs, so its output directory is
named by a hash of exactly those: `CACHE/<stage>/<key>`. That buys three things:

* re-running a build skips every stage whose output is already complete;
* two recipes that differ only in a late stage share the early stages' outputs;
* a build killed at any moment leaves nothing that looks complete: a stage writes into a
  temporary directory, writes its completion marker last, and only then renames the directory
  to its key. A directory without the marker is never trusted.

A per-key file lock lets several builds (say, parallel runs of an integration round) share one
cache: the second builder of a stage waits, then finds it complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stacklab.errors import StacklabError
from stacklab.fileio import write_atomic
from stacklab.recipe import Recipe, canonical_hash

MARKER = "_COMPLETE.json"

Metrics = dict[str, float]


@dataclass
class StageContext:
    """What a stage's `run` receives."""

    recipe: Recipe
    out: Path  # a fresh temporary directory: write the stage's files here
    inputs: dict[str, Path]  # dependency name → its completed output directory


@dataclass(frozen=True)
class Stage:
    """One step of a build.

    `config` returns the settings the stage reads (its cache key covers nothing else, so it
    must return everything that changes the output); `fingerprint` identifies external inputs
    such as user data files by content. Bump `version` when the stage's code changes what it
    writes. A `resumable` stage (training) finds its previous attempt's files in `ctx.out`
    and must only trust what it wrote atomically there (its checkpoints).
    """

    name: str
    version: int
    deps: tuple[str, ...]
    config: Callable[[Recipe], Any]
    run: Callable[[StageContext], Metrics]
    fingerprint: Callable[[Recipe], Any] | None = None
    resumable: bool = False  # keeps its work directory across killed builds (checkpoints)


@dataclass
class StageResult:
    name: str
    key: str
    path: Path
    metrics: Metrics
    cached: bool
    seconds: float


@dataclass
class BuildResult:
    out: Path
    stages: list[StageResult] = field(default_factory=list)

    @property
    def metrics(self) -> Metrics:
        merged: Metrics = {}
        for stage in self.stages:
            merged.update(stage.metrics)
        return merged


def default_cache_root() -> Path:
    """`$STACKLAB_CACHE`, else `$XDG_CACHE_HOME/stacklab`, else `~/.cache/stacklab`."""
    if env := os.environ.get("STACKLAB_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stacklab"


def stage_keys(recipe: Recipe, stages: list[Stage]) -> dict[str, str]:
    """The cache key of every stage, each covering its config and its inputs' keys."""
    keys: dict[str, str] = {}
    for stage in stages:
        missing = [d for d in stage.deps if d not in keys]
        if missing:
            raise ValueError(f"stage {stage.name} depends on {missing}, which come later")
        keys[stage.name] = canonical_hash(
            {
                "stage": stage.name,
                "version": stage.version,
                "config": stage.config(recipe),
                "fingerprint": stage.fingerprint(recipe) if stage.fingerprint else None,
                "inputs": {d: keys[d] for d in stage.deps},
            }
        )
    return keys


class StageCache:
    """Completed stage outputs under `root/<stage>/<key>`, built atomically under a lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Metrics | None:
        """The stage's metrics if its output is complete, else None."""
        marker = self.path(stage, key) / MARKER
        if not marker.is_file():
            return None
        return json.loads(marker.read_text())["metrics"]

    def build(
        self, stage: str, key: str, make: Callable[[Path], Metrics], resumable: bool = False
    ) -> tuple[Metrics, bool]:
        """Return (metrics, cached): run `make(work_dir)` unless another build already did.

        A resumable stage works in `<key>.partial`, which survives a killed build so the stage
        can continue from its own checkpoints; any other stage starts from an empty
        `<key>.tmp-*` directory every time.
        """
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with _locked(final.parent / f"{key}.lock"):
            found = self.lookup(stage, key)
            if found is not None:
                return found, True
            # Anything left here by a killed build is incomplete: we hold the lock, so remove it.
            for stale in final.parent.glob(f"{key}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():
                shutil.rmtree(final)
            if resumable:
                tmp = final.parent / f"{key}.partial"
                tmp.mkdir(exist_ok=True)
            else:
                tmp = final.parent / f"{key}.tmp-{uuid.uuid4().hex[:8]}"
                tmp.mkdir()
            start = time.perf_counter()
            metrics = make(tmp)
            record = {
                "stage": stage,
                "key": key,
                "metrics": metrics,
                "seconds": round(time.perf_counter() - start, 3),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_atomic(tmp / MARKER, json.dumps(record, indent=2))
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            return metrics, False


def build(
    recipe: Recipe,
    out: Path,
    stages: list[Stage],
    cache_root: Path | None = None,
    until: str | None = None,
    on_stage: Callable[[Stage, str], None] | None = None,
) -> BuildResult:
    """Run (or reuse) every stage up to `until`; link outputs under `out`, write metrics.json.

    `out` receives `recipe.yaml` (the resolved recipe), a symlink per stage to its cached
    output, `build.json` (keys, cache hits, timings) and `metrics.json` (every stage's
    metrics, flat).
    """
    names = [s.name for s in stages]
    if until is not None:
        if until not in names:
            raise StacklabError(f"unknown stage {until!r}; stages are: {', '.join(names)}")
        stages = stages[: names.index(until) + 1]
    cache = StageCache(cache_root or default_cache_root())
    keys = stage_keys(recipe, stages)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "recipe.yaml", recipe.to_yaml())

    result = BuildResult(out=out)
    for stage in stages:
        key = keys[stage.name]
        if on_stage is not None:
            on_stage(stage, key)
        inputs = {d: cache.path(d, keys[d]) for d in stage.deps}
        start = time.perf_counter()

        def make(tmp: Path, stage: Stage = stage, inputs: dict[str, Path] = inputs) -> Metrics:
            return stage.run(StageContext(recipe=recipe, out=tmp, inputs=inputs))

        metrics, cached = cache.build(stage.name, key, make, stage.resumable)
        path = cache.path(stage.name, key)
        _link(out / stage.name, path)
        result.stages.append(
            StageResult(stage.name, key, path, metrics, cached, time.perf_counter() - start)
        )

    report = [
        {
            "stage": s.name,
            "key": s.key,
            "cached": s.cached,
            "seconds": round(s.seconds, 3),
            "path": str(s.path),
        }
        for s in result.stages
    ]
    write_atomic(out / "build.json", json.dumps({"stages": report}, indent=2))
    write_atomic(out / "metrics.json", json.dumps(result.metrics, indent=2, sort_keys=True))
    return result


# --------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(link: Path, target: Path) -> None:
    """Point `link` at `target`, replacing an older link atomically."""
    if link.exists() and not link.is_symlink():
        raise StacklabError(f"{link} exists and is not a stage link; choose another --out")
    tmp = link.with_name(f".{link.name}.link-{uuid.uuid4().hex[:8]}")
    tmp.symlink_to(target.resolve(), target_is_directory=True)
    os.replace(tmp, link)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
