"""Runners and executors: how one run (a resolved recipe and a seed) becomes metrics.

A runner is a command. The built-in one is `stacklab build`; an external one is any trainer
given as a template with `{recipe}`, `{seed}`, `{out}` and `{tree}`. Either way the engine
writes the resolved config to a file in the run's folder (a recipe as `recipe.yaml`, another
baseline in its own format), runs the command without a shell (arguments are split once, then
each is filled in, so paths with spaces stay whole) in the run's code tree (a git round) or the
round file's folder, and reads `{out}/metrics.json`.

A run is atomic: the command writes into a temporary folder that is flushed to disk and
renamed to the run's final folder (`fileio.publish_dir`) only once its metrics are read and
complete. A final folder therefore always holds a finished run, and a coordinator killed
between the rename and recording the result finds it there next time instead of training
again. A failed run's folder is kept beside it
(`KEY.failed`) with the command's logs; the failure, with the tail of its stderr, goes to the
store and never counts as a result.

A temporary folder is named `.KEY.tmp-OWNER-RANDOM`, OWNER being the owner token of the run
store that claimed the run (the coordinator's lease, see store.py). `remove_partial_runs`, run
when an engine starts, removes only those whose owner is not a live claimer: another engine
sharing the store, even on the same `--out`, keeps the folders it is writing. Two writers of
the same run (a claim that lapsed and was taken again) both end well: the first folder renamed
into place stands, and the second writer returns that run's metrics.

Executors only decide where runs happen: a local pool of threads, each waiting on one child
process (the work is in the children, so threads are enough), or Ray for a cluster.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from stacklab.errors import StacklabError
from stacklab.fileio import publish_dir
from stacklab.integrate.round import BuiltinRunner, ExternalRunner, LocalExecutor, RayExecutor

STDERR_TAIL_CHARS = 2000
_BUILD = "import sys; from stacklab.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class Job:
    """One run to make: `recipe` is the resolved config (a recipe has `seed` set in it)."""

    key: str
    recipe: dict[str, Any]
    seed: int
    run_dir: Path  # the final folder; written only through a temporary sibling
    config_text: str | None = None  # the file {recipe} names; None: `recipe` as YAML
    config_name: str = "recipe.yaml"
    cwd: Path | None = None  # where the command runs (a git round's tree); None: the runner's


@dataclass(frozen=True)
class Outcome:
    """What became of a job: metrics (a finished run) or an error (a failed one)."""

    key: str
    metrics: dict[str, float] | None
    error: str | None
    seconds: float


class RunFailed(Exception):
    """The run's command failed or its metrics are unusable; the message says which."""


@dataclass(frozen=True)
class CommandRunner:
    """Runs a command template per job (picklable, so Ray can ship it to other machines)."""

    template: tuple[str, ...]
    cwd: Path
    required: tuple[str, ...]  # metrics every run must report
    timeout_s: float | None = None
    threads: int | None = None  # OMP_NUM_THREADS for the child, unless the caller set it
    owner: str = ""  # the claiming store's owner token, in the temporary folders' names

    def argv(self, recipe: Path, seed: int, out: Path, tree: Path | None = None) -> list[str]:
        tree = tree or self.cwd
        return [a.format(recipe=recipe, seed=seed, out=out, tree=tree) for a in self.template]

    def __call__(self, job: Job) -> Outcome:
        start = time.perf_counter()
        final = job.run_dir
        if (final / "metrics.json").is_file():  # finished before the coordinator was killed
            try:
                metrics = read_metrics(final / "metrics.json", self.required)
                return Outcome(job.key, metrics, None, time.perf_counter() - start)
            except RunFailed:
                shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / tmp_name(final.name, self.owner)
        tmp.mkdir()
        try:
            metrics = self._run_in(tmp, job)
        except RunFailed as exc:
            failed = final.parent / f"{final.name}.failed"
            if not tmp.is_dir():
                error = f"{exc}; its temporary folder {tmp} was removed by another process"
            elif _move_dir(tmp, failed):
                error = f"{exc} (logs: {failed})"
            else:
                error = f"{exc} (logs: {tmp})"
            return Outcome(job.key, None, error, time.perf_counter() - start)
        except OSError as exc:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            error = f"its temporary folder {tmp} was removed by another process ({exc})"
            return Outcome(job.key, None, error, time.perf_counter() - start)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for _ in range(3):
            landed = self._landed(final)
            if landed is not None:  # another writer of this run finished first: it stands
                shutil.rmtree(tmp, ignore_errors=True)
                metrics = landed
                break
            try:
                publish_dir(tmp, final, replace=False)  # fails over a non-empty folder
                break
            except FileNotFoundError:
                error = f"its temporary folder {tmp} was removed by another process"
                return Outcome(job.key, None, error, time.perf_counter() - start)
            except OSError:  # a folder is there: another writer's run, or an unfinished one
                if self._landed(final) is None:
                    shutil.rmtree(final, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"could not move the finished run into {final}"
            return Outcome(job.key, None, error, time.perf_counter() - start)
        return Outcome(job.key, metrics, None, time.perf_counter() - start)

    def _landed(self, final: Path) -> dict[str, float] | None:
        """The metrics of the finished run in `final`, if one is there."""
        if not (final / "metrics.json").is_file():
            return None
        try:
            return read_metrics(final / "metrics.json", self.required)
        except (RunFailed, OSError):
            return None

    def _run_in(self, out: Path, job: Job) -> dict[str, float]:
        recipe = out / job.config_name
        if job.config_text is None:
            recipe.write_text(yaml.safe_dump(job.recipe, sort_keys=False))
        else:
            recipe.write_text(job.config_text)
        cwd = job.cwd or self.cwd
        argv = self.argv(recipe, job.seed, out, cwd)
        env = dict(os.environ)
        if self.threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(self.threads))
        with (out / "stdout.log").open("wb") as so, (out / "stderr.log").open("wb") as se:
            try:
                proc = subprocess.Popen(
                    argv, cwd=cwd, stdout=so, stderr=se, env=env, start_new_session=True
                )
            except OSError as exc:
                raise RunFailed(f"cannot start {shlex.join(argv[:1])}: {exc}") from None
            with _live(proc):
                try:
                    code = proc.wait(self.timeout_s)
                except subprocess.TimeoutExpired:
                    _kill(proc)
                    raise RunFailed(
                        f"timed out after {self.timeout_s:g}s{_tail(out / 'stderr.log')}"
                    ) from None
        if code != 0:
            raise RunFailed(f"exit status {code}{_tail(out / 'stderr.log')}")
        return read_metrics(out / "metrics.json", self.required)


def _move_dir(src: Path, dst: Path) -> bool:
    """Rename folder `src` to `dst`, replacing what is there; False if another process keeps
    putting a folder at `dst` (or `src` is gone)."""
    for _ in range(3):
        shutil.rmtree(dst, ignore_errors=True)
        try:
            os.rename(src, dst)
            return True
        except FileNotFoundError:
            return False
        except OSError:  # `dst` appeared again between the two steps: another writer's
            continue
    return False


_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<owner>[0-9a-f]{16})-)?[0-9a-f]{8}$")


def tmp_name(name: str, owner: str) -> str:
    """A temporary folder's name for the run folder `name`, written for store `owner`."""
    tag = f"{owner}-" if owner else ""
    return f".{name}.tmp-{tag}{uuid.uuid4().hex[:8]}"


def tmp_owner(name: str) -> str | None:
    """The owner token in a temporary folder's name; None for another or an older name."""
    match = _TMP.match(name)
    return match["owner"] if match else None


def remove_partial_runs(runs_dir: Path, live_owners: Callable[[], Collection[str]]) -> list[Path]:
    """Remove the temporary run folders of owners that are gone (a killed engine's); return
    them. Folders of owners in `live_owners()` stay: another engine is writing them.

    The folders are listed before the live owners are asked for: an owner registers its lease
    before it makes a folder, so a folder listed here has an owner that the answer knows.
    """
    if not runs_dir.is_dir():
        return []
    found = [p for p in runs_dir.glob(".*.tmp-*") if _TMP.match(p.name)]
    if not found:
        return []
    live = set(live_owners())
    removed = [p for p in found if tmp_owner(p.name) not in live]
    for tmp in removed:
        shutil.rmtree(tmp, ignore_errors=True)
    return removed


def read_metrics(path: Path, required: Sequence[str]) -> dict[str, float]:
    """The numeric entries of a metrics.json; every `required` metric must be a finite number."""
    if not path.is_file():
        raise RunFailed(f"the runner wrote no {path.name}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFailed(f"{path.name} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise RunFailed(f"{path.name} must be an object of metric -> number")
    metrics = {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    for name in required:
        if name not in metrics:
            if name in raw:
                raise RunFailed(f"{path.name}: metric {name!r} is {raw[name]!r}, not a number")
            have = ", ".join(sorted(metrics)) or "none"
            raise RunFailed(f"{path.name} has no metric {name!r} (has: {have})")
    return metrics


def make_runner(
    spec: BuiltinRunner | ExternalRunner, cwd: Path, required: Sequence[str], workers: int
) -> CommandRunner:
    """The runner a round asks for; children get an even share of the CPU cores."""
    if isinstance(spec, ExternalRunner):
        template = tuple(shlex.split(spec.command))
    else:
        template = (sys.executable, "-c", _BUILD, "build", "{recipe}", "--out", "{out}")
        if spec.cache_dir is not None:
            template += ("--cache-dir", str((cwd / spec.cache_dir).resolve()))
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    return CommandRunner(template, cwd, tuple(required), spec.timeout_s, threads)


# --------------------------------------------------------------------------- child processes

_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


@contextlib.contextmanager
def _live(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    with _LIVE_LOCK:
        _LIVE.add(proc)
    try:
        yield
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)


def kill_live() -> None:
    """Kill every run still training (on Ctrl-C): each child leads its own process group."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    if not text:
        return ""
    tail = text[-STDERR_TAIL_CHARS:]
    return f"; stderr ends: {tail}"


# --------------------------------------------------------------------------- executors


class Executor(Protocol):
    def run(self, runner: CommandRunner, jobs: Sequence[Job]) -> Iterator[Outcome]:
        """Run the jobs; yield each outcome as soon as it is known."""
        ...


@dataclass(frozen=True)
class LocalPool:
    """Up to `workers` runs at once on this machine."""

    workers: int

    def run(self, runner: CommandRunner, jobs: Sequence[Job]) -> Iterator[Outcome]:
        if not jobs:
            return
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="run") as pool:
            futures = [pool.submit(runner, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    yield future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                kill_live()
                raise


@dataclass(frozen=True)
class RayPool:
    """Runs as Ray tasks: `ray.init(address=...)` joins a cluster (None: a local instance).

    Run folders are written where the task runs, so on several machines `--out` should be on
    a shared filesystem; the metrics come back to the coordinator either way. Paths are made
    absolute here first: a task's working directory is not the coordinator's. Every machine
    needs stacklab installed (the task is `stacklab.integrate.runners._call`).
    """

    address: str | None
    cpus_per_run: float = 1.0
    cancel_grace_s: float = 10.0  # on Ctrl-C, how long running tasks get to kill their trainers

    def run(self, runner: CommandRunner, jobs: Sequence[Job]) -> Iterator[Outcome]:
        if not jobs:
            return
        ray = _import_ray()
        if not ray.is_initialized():
            # Quiet: the engine owns the terminal, and a task's output is in its run folder.
            # No dashboard: a local instance is for this round, not a web server left open.
            ray.init(
                address=self.address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        runner = replace(runner, cwd=runner.cwd.absolute())
        task = ray.remote(num_cpus=self.cpus_per_run)(_call)
        pending = {
            task.remote(runner, replace(job, run_dir=job.run_dir.absolute())): job for job in jobs
        }
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # the task itself died (node lost, OOM, ...)
                        outcome = Outcome(job.key, None, f"ray task failed: {exc}", 0.0)
                    yield outcome
        finally:
            if pending:
                self._cancel(ray, list(pending))

    def _cancel(self, ray: Any, refs: list[Any]) -> None:
        """Stop the tasks, each killing its trainer's process group first: a forced cancel
        kills the Ray worker and its direct child, but what the trainer started trains on."""
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)
        with contextlib.suppress(Exception):
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=self.cancel_grace_s)
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)


def _call(runner: CommandRunner, job: Job) -> Outcome:
    """A Ray task: the run, in a thread, so that a cancel reaches this one while it waits.

    Ray cancels a running task by raising KeyboardInterrupt in its main thread, which a
    blocking wait for the child would not see until the child ends. Here the main thread
    polls instead, and on a cancel kills this worker's trainers (as LocalPool does) so the
    run ends as a failure and its temporary folder does not stay behind.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="run") as pool:
        future = pool.submit(runner, job)
        try:
            while not wait([future], timeout=0.2).done:
                pass
        except BaseException:
            while not future.done():  # again until it ends: a trainer may have been starting
                kill_live()
                wait([future], timeout=0.2)
            raise
        return future.result()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise StacklabError(
            "executor kind 'ray' needs Ray: pip install ray (or use kind: local)"
        ) from None
    return ray


def make_executor(spec: LocalExecutor | RayExecutor, workers: int) -> Executor:
    if isinstance(spec, RayExecutor):
        _import_ray()  # fail at the start of a round, not at its first batch
        if (spec.address or "").startswith("ray://") and importlib.util.find_spec("grpc") is None:
            raise StacklabError(
                f"executor address {spec.address} is a Ray Client address, which needs "
                "pip install 'ray[client]' (or give the cluster's GCS address, host:6379)"
            )
        return RayPool(spec.address, spec.cpus_per_run)
    return LocalPool(workers)
