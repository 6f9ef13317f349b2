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

The key also covers the stage's own code: the source of the module that defines `run` and of
every stacklab module it imports, directly or not (`stage_code_hash`). Editing a module rebuilds
the stages whose code reaches it and the stages after them, with no version to bump. The unit
is the module, not the function: the three data stages share `data/build.py`, so an edit to
the tokenizer's code rebuilds the corpus stage too.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stacklab.errors import StacklabError
from stacklab.fileio import publish_dir, replace_symlink, write_atomic
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
    such as user data files by content. The key covers the stage's code by itself (see
    `stage_code_hash`), so a code change needs no `version` bump; `version` still counts, for
    what the code hash cannot see (a change in a third-party library, say). A `resumable`
    stage (training) finds its previous attempt's files in `ctx.out` and must only trust what
    it wrote atomically there (its checkpoints).
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
    """The cache key of every stage, each covering its config, its code and its inputs' keys."""
    keys: dict[str, str] = {}
    digests: dict[Path, str] = {}  # files read once per call, shared by the stages
    for stage in stages:
        missing = [d for d in stage.deps if d not in keys]
        if missing:
            raise ValueError(f"stage {stage.name} depends on {missing}, which come later")
        keys[stage.name] = canonical_hash(
            {
                "stage": stage.name,
                "version": stage.version,
                "code": stage_code_hash(stage, digests),
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
            publish_dir(tmp, final)
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


# --------------------------------------------------------------------------- stage code

# Modules left out of every stage's code hash: the harness that runs stages and caches their
# output, not code that decides what a stage writes.
NOT_STAGE_CODE = frozenset({"stacklab.pipeline", "stacklab.tracking"})


def stage_code_hash(stage: Stage, digests: dict[Path, str] | None = None) -> str | None:
    """A hash of the code behind `stage.run`, or None where it has no source file.

    It covers the source bytes of the module that defines `run` and, transitively, of every
    module it imports from stacklab (or from the run module's own top-level package), found by
    parsing `import` statements anywhere in each file, function bodies included, and resolving
    them on disk (`import_closure`); package `__init__` files count, since importing runs
    them. Only contents count, never paths, so a checkout and an installed copy agree. A
    `run` defined where there is no source (in `python -c`, a REPL) has only `version`.
    `digests` memoizes the files already read (path → sha256).
    """
    run: Any = stage.run
    while hasattr(run, "func"):  # functools.partial
        run = run.func
    name = getattr(run, "__module__", None) or type(run).__module__
    code = getattr(run, "__code__", None)
    file = code.co_filename if code else getattr(sys.modules.get(name), "__file__", None)
    if not name or not file or not Path(file).is_file():
        return None
    roots = [(_STACKLAB_ROOT, frozenset({"stacklab"}))]
    if (own := _package_root(Path(file), name)) is not None and own != _STACKLAB_ROOT:
        roots.append((own, frozenset({name.partition(".")[0]})))
    found = import_closure(Path(file), name, roots, skip=NOT_STAGE_CODE, digests=digests)
    return canonical_hash(sorted(found.values()))


def import_closure(
    start: Path,
    module: str,
    roots: Sequence[tuple[Path, frozenset[str] | None]],
    skip: frozenset[str] = frozenset(),
    digests: dict[Path, str] | None = None,
) -> dict[Path, str]:
    """`start` and every Python file it imports, directly or not: resolved path → sha256 of
    its bytes.

    `module` is the dotted name `start` is imported as ("" for a script run by path, whose
    relative imports are then ignored). An imported name `a.b.c` is looked for as
    `ROOT/a/b/c.py` or `ROOT/a/b/c/__init__.py` under each of `roots`, a root given with a set
    of top-level names only serving those; `a` and `a.b` count too (importing runs them). A
    name found under no root (the standard library, third-party packages) is not followed,
    nor is one in `skip`. Imports are read with `ast` from the whole file, so one inside a
    function or an `if TYPE_CHECKING:` block counts as well; a file that does not parse is
    hashed but not followed.
    """
    digests = {} if digests is None else digests
    roots = [(Path(root).resolve(), tops) for root, tops in roots]
    found: dict[Path, str] = {}
    todo = [(Path(start).resolve(), module)]
    parents = module.split(".")[:-1]  # importing `start` ran its packages' __init__ too
    for n in range(1, len(parents) + 1):
        if (parent := _module_file(".".join(parents[:n]), roots)) is not None:
            todo.append((parent, ".".join(parents[:n])))
    while todo:
        path, name = todo.pop()
        if path in found:
            continue
        data = None
        if path not in digests:
            data = path.read_bytes()
            digests[path] = hashlib.sha256(data).hexdigest()
        digest = found[path] = digests[path]
        if path.suffix != ".py":
            continue
        for imported in _imported_names(path, data, digest, name):
            parts = imported.split(".")
            for n in range(1, len(parts) + 1):
                dotted = ".".join(parts[:n])
                if dotted in skip:
                    break
                target = _module_file(dotted, roots)
                if target is not None and target not in found:
                    todo.append((target, dotted))
    return found


_IMPORTS: dict[str, tuple[tuple[str, int, tuple[str, ...]], ...]] = {}  # sha256 → imports


def _imported_names(path: Path, data: bytes | None, digest: str, module: str) -> list[str]:
    """Dotted names a file's imports may load, relative ones made absolute (parsed once)."""
    if digest not in _IMPORTS:
        try:
            tree = ast.parse(path.read_bytes() if data is None else data)
        except (SyntaxError, ValueError):
            tree = ast.Module(body=[], type_ignores=[])
        found: list[tuple[str, int, tuple[str, ...]]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.extend((alias.name, 0, ()) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names = tuple(a.name for a in node.names if a.name != "*")
                found.append((node.module or "", node.level, names))
        _IMPORTS[digest] = tuple(found)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for base, level, members in _IMPORTS[digest]:
        if level:
            anchor = package
            for _ in range(level - 1):
                anchor = anchor.rpartition(".")[0]
            if not anchor:
                continue  # beyond the top-level package, or a script's relative import
            base = f"{anchor}.{base}" if base else anchor
        if base:
            names.append(base)
            names.extend(f"{base}.{m}" for m in members)  # a submodule, or just an attribute
    return names


def _module_file(dotted: str, roots: Sequence[tuple[Path, frozenset[str] | None]]) -> Path | None:
    parts = dotted.split(".")
    for root, tops in roots:
        if tops is not None and parts[0] not in tops:
            continue
        base = root.joinpath(*parts)
        for candidate in (base.with_name(parts[-1] + ".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


_STACKLAB_ROOT = Path(__file__).resolve().parent.parent  # the folder holding `stacklab/`


def _package_root(file: Path, module: str) -> Path | None:
    """The folder holding the top-level package of `module`, which `file` defines (None for a
    top-level plain module, or where the file's place does not match the name)."""
    parts = module.split(".")
    up = len(parts) if file.name == "__init__.py" else len(parts) - 1
    if up == 0:
        return None
    parents = file.resolve().parents
    if up >= len(parents):
        return None
    root = parents[up]
    return root if _module_file(module, [(root, None)]) is not None else None


# --------------------------------------------------------------------------- file helpers


def _link(link: Path, target: Path) -> None:
    """Point `link` at `target`, replacing an older link atomically."""
    if link.exists() and not link.is_symlink():
        raise StacklabError(f"{link} exists and is not a stage link; choose another --out")
    replace_symlink(link, target.resolve())


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
