"""Several engines at once: on one round folder, and on one shared run store.

* The round folder's own SQLite store belongs to one engine: a second engine on the folder
  is refused at once with a one-line error naming the first, changes nothing, and the first
  ends normally (before, the second deleted the first's temporary run folders at start and the
  first died with a FileNotFoundError).
* Engines whose round names a shared store (PostgreSQL) cooperate, on one `--out` or several:
  each removes at start only the temporary folders of engines that are gone, claims only
  pending runs, and hands back only the runs of claimers whose lease is gone. Every run is
  trained once and both engines reach the same decision without a traceback.

The PostgreSQL tests need STACKLAB_TEST_PG_URL (see test_integrate_store_pg.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from integrate_sim.scenarios import OBJECTIVE, small, write_round
from stacklab.integrate.engine import _Session, integrate
from stacklab.integrate.lock import LOCK_NAME, RoundFolderInUse, hold_round_folder
from stacklab.integrate.runners import (
    CommandRunner,
    Job,
    Outcome,
    remove_partial_runs,
    tmp_name,
    tmp_owner,
)
from stacklab.integrate.store import LeaseRow, RunStore, StoreError, _machine
from test_integrate_simulation import log_counts, quiet
from test_integrate_store_pg import pg_schema_url

# The stand-in trainer of the simulation tests, held at a gate: a run starts, then waits
# until the test creates the gate file (or a minute passes), so engines overlap for certain.
GATED = """
import os, runpy, sys, time
deadline = time.monotonic() + 60
while not os.path.exists({gate!r}) and time.monotonic() < deadline:
    time.sleep(0.02)
sys.argv = [{objective!r}, *sys.argv[1:]]
runpy.run_path({objective!r}, run_name="__main__")
"""


def gated_round(root: Path, **extra: Any) -> tuple[Path, Path, Path]:
    """The small scenario at its smallest (2 seeds, 20 runs), its trainer held at a gate;
    returns (round file, run log, gate file)."""
    root.mkdir(parents=True, exist_ok=True)
    gate = root / "go"
    trainer = root / "gated_objective.py"
    trainer.write_text(GATED.format(gate=str(gate), objective=str(OBJECTIVE)))
    command = f"{sys.executable} {trainer} {{recipe}} {{seed}} {{out}} scenario.json"
    log = root / "runs.log"
    round_file = write_round(
        root / "round", small(), budget=30, seeds=2, confirm_seeds=2, log=log,
        runner={"kind": "external", "command": command}, **extra,
    )  # fmt: skip
    return round_file, log, gate


class Engine:
    """`stacklab integrate ROUND --out OUT` in a process of its own, output to a file."""

    def __init__(self, round_file: Path, out: Path, log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
        cmd = [sys.executable, "-m", "stacklab.cli", "integrate", str(round_file), "--out"]
        self.log = log
        with log.open("w") as f:
            self.proc = subprocess.Popen([*cmd, str(out)], env=env, stdout=f, stderr=f)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, done: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.proc.poll() is None, f"the engine ended before {what}: {self.output}"
            assert time.monotonic() < deadline, f"the engine never {what}: {self.output}"
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return code, self.output


def partial_runs(runs_dir: Path) -> list[Path]:
    return list(runs_dir.glob(".*.tmp-*")) if runs_dir.is_dir() else []


# --------------------------------------------------------------------------- round folder


@pytest.mark.slow
def test_a_second_engine_on_a_round_folder_is_refused_and_the_first_ends_well(
    tmp_path: Path,
) -> None:
    round_file, log, gate = gated_round(tmp_path)
    out = tmp_path / "out"
    first = Engine(round_file, out, tmp_path / "first.log")
    try:
        first.wait_for(lambda: bool(partial_runs(out / "runs")), "started a run")
        writing = partial_runs(out / "runs")
        start = time.monotonic()
        code, output = Engine(round_file, out, tmp_path / "second.log").finish(timeout=60)
        refused_in = time.monotonic() - start
        assert first.proc.poll() is None  # the refusal came while the first was training
        assert all(p.is_dir() for p in writing)  # and left its runs alone
    finally:
        gate.touch()
        first_code, first_output = first.finish()
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert re.fullmatch(
        rf"error: round folder {re.escape(str(out))} in use by pid {first.proc.pid} since "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(another `stacklab integrate` on this folder: .*\)",
        lines[0],
    ), lines[0]
    assert refused_in < 30  # at once: no waiting for the first engine (imports aside)
    assert first_code == 0, first_output
    assert "Traceback" not in first_output
    decision = json.loads((out / "decision.json").read_text())
    assert set(log_counts(log).values()) == {1}  # every run trained once
    assert sum(log_counts(log).values()) == decision["runs"]["total"]
    assert not list((out / "runs").glob(".*.tmp-*"))


def test_a_refused_engine_changes_nothing(tmp_path: Path) -> None:
    round_file, _, _ = gated_round(tmp_path)
    out = tmp_path / "out"
    partial = out / "runs" / f".{'k' * 16}.tmp-0123456789abcdef-deadbeef"
    partial.mkdir(parents=True)
    refused = pytest.raises(RoundFolderInUse, match=rf"in use by pid {os.getpid()} since ")
    with hold_round_folder(out, shared=False):  # an engine of this process holds the folder
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        with refused:
            integrate(round_file, out, console=quiet())
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # no runs.db either
    assert partial.is_dir()


def test_the_folder_lock_modes_and_a_killed_holder(tmp_path: Path) -> None:
    def refused(match: str, shared: bool) -> None:
        with pytest.raises(RoundFolderInUse, match=match), hold_round_folder(tmp_path, shared):
            pass

    with hold_round_folder(tmp_path, shared=True), hold_round_folder(tmp_path, shared=True):
        refused(r"an engine whose round names a shared store", shared=False)
    with hold_round_folder(tmp_path, shared=False):
        refused(r"folder's own SQLite store", shared=True)
    # A holder that is killed leaves no stale lock: the kernel drops it with the process.
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from pathlib import Path; "
            "from stacklab.integrate.lock import hold_round_folder as h\n"
            f"with h(Path({str(tmp_path)!r}), shared=False):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused(rf"in use by pid {holder.pid} since", shared=False)
    finally:
        holder.kill()
        holder.wait()
    with hold_round_folder(tmp_path, shared=False):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


# --------------------------------------------------------------------------- cleanup, leases


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _add_lease(store: RunStore, lease_id: str, host: str, pid: int, expires_in_s: float) -> None:
    now = datetime.now(UTC)
    with Session(store.engine) as session:
        session.add(
            LeaseRow(
                id=lease_id, host=host, pid=pid, started_at=now, renewed_at=now,
                expires_at=now + timedelta(seconds=expires_in_s),
            )
        )  # fmt: skip
        session.commit()


def test_cleanup_spares_live_owners_folders_and_removes_dead_ones(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with RunStore(url) as mine, RunStore(url, reset_stale=False) as other:
        keys = [other.request(f"h{i}", 0, [], "r", 0, {"seed": 0}).key for i in range(5)]
        other.claim_pending(1, keys=keys[:1])  # a live engine, with its lease
        # Other engines' leases: on another machine, live; here, but its process has exited;
        # expired (its engine stopped renewing: killed on another machine, or hung).
        _add_lease(mine, "a" * 16, "another machine", 1, expires_in_s=60)
        _add_lease(mine, "b" * 16, _machine(), _dead_pid(), expires_in_s=60)
        _add_lease(mine, "c" * 16, "another machine", 1, expires_in_s=-1)
        with Session(mine.engine) as session:  # runs they were training
            for key, owner in zip(keys[1:], ["a" * 16, "b" * 16, "c" * 16, None], strict=True):
                session.execute(
                    text("UPDATE runs SET status = 'running', owner = :o WHERE key = :k"),
                    {"o": owner, "k": key},
                )
            session.commit()
        folders = {
            who: runs_dir / tmp_name(f"run-{who}", owner)
            for who, owner in [
                ("live", other.owner), ("remote", "a" * 16), ("exited", "b" * 16),
                ("expired", "c" * 16), ("never-leased", "d" * 16), ("old-style", ""),
            ]
        }  # fmt: skip
        for folder in folders.values():
            folder.mkdir()
        assert tmp_owner(folders["live"].name) == other.owner
        assert tmp_owner(folders["old-style"].name) is None

        removed = remove_partial_runs(runs_dir, mine.live_owners)
        assert sorted(removed) == sorted(
            folders[w] for w in ("exited", "expired", "never-leased", "old-style")
        )
        assert folders["live"].is_dir() and folders["remote"].is_dir()
        assert mine.live_owners() == {other.owner, "a" * 16}  # the dead leases are dropped

        assert mine.reset_dead() == 3  # the exited and expired owners' runs, and the ownerless
        status = {k: mine.get(k).status for k in keys}  # type: ignore[union-attr]
        assert [status[k] for k in keys] == ["running", "running", "pending", "pending", "pending"]
    # A closed store's lease is gone, and with it the claim on its runs.
    with RunStore(url, reset_stale=False) as later:
        assert later.reset_dead() == 1  # `other`'s run; the remote engine's lease is live
        assert later.live_owners() == {"a" * 16}
    # With the folder to itself (the default store), an engine removes every partial run.
    assert sorted(remove_partial_runs(runs_dir, frozenset)) == sorted(
        [folders["live"], folders["remote"]]
    )


@pytest.mark.slow
def test_a_lease_is_renewed_while_its_store_lives(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    with RunStore(url, lease_s=0.5) as claimer, RunStore(url, reset_stale=False) as reaper:
        key = claimer.request("h", 0, [], "r", 0, {"seed": 0}).key
        claimer.claim_pending(1)
        time.sleep(1.5)  # three leases long: only the renewals keep it
        assert reaper.reset_dead() == 0
        assert reaper.live_owners() == {claimer.owner}
        claimer._stop.set()  # the claimer hangs: no more renewals
        claimer._beat.join()  # type: ignore[union-attr]
        time.sleep(1.0)
        assert reaper.reset_dead() == 1 and reaper.get(key).status == "pending"  # type: ignore[union-attr]


def test_a_store_from_before_leases_gets_the_owner_and_code_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE runs (id INTEGER PRIMARY KEY, key VARCHAR(64) UNIQUE, "
                "recipe_hash VARCHAR(64), seed INTEGER, subset JSON, round VARCHAR(200), "
                "batch INTEGER, status VARCHAR(16), metrics JSON, error TEXT, attempts INTEGER, "
                "created_at DATETIME, started_at DATETIME, finished_at DATETIME, recipe JSON)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO runs VALUES (1, 'k', 'h', 0, '[]', 'r', 0, 'running', NULL, NULL, "
                "1, '2026-01-01 00:00:00', '2026-01-01 00:00:00', NULL, '{}')"
            )
        )
    engine.dispose()
    with RunStore(url, reset_stale=False) as store:
        old = store.get("k")
        assert old is not None and old.owner is None and old.code is None
        assert old.provenance is None
        assert store.reset_dead() == 1  # a claim from before leases has no live claimer
        assert [r.owner for r in store.claim_pending(1)] == [store.owner]


def test_a_failure_is_not_recorded_over_another_live_claim(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    with RunStore(url) as a, RunStore(url, reset_stale=False) as b:
        key = a.request("h", 0, [], "r", 0, {"seed": 0}).key
        a.claim_pending(1)
        with Session(a.engine) as session:  # a's claim lapsed; b took the run over
            session.execute(text("UPDATE runs SET owner = :o"), {"o": b.owner})
            session.commit()
        b.claim_pending(0)  # b's lease
        assert a.fail(key, "late failure").status == "running"  # b's attempt counts
        assert a.finish(key, {"x": 1.0}).status == "done"  # a result is never thrown away
        with pytest.raises(StoreError, match="already done"):
            b.finish(key, {"x": 2.0})


def test_the_engine_keeps_the_first_result_of_a_run_two_engines_finished(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    with RunStore(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        key = store.request("h", 0, [], "r", 0, {"seed": 0}).key
        store.claim_pending(1)
        store.finish(key, {"x": 1.0})  # the other engine's result, first
        stub = SimpleNamespace(store=store, points={}, say=said.append)
        _Session._record(stub, Outcome(key, {"x": 2.0}, None, 0.1))  # type: ignore[arg-type]
        _Session._record(stub, Outcome(key, None, "boom", 0.1))  # type: ignore[arg-type]
        assert store.get(key).metrics == {"x": 1.0}  # type: ignore[union-attr]
    assert said == [f"  run ({key}) was finished by another engine first; its result is kept"] * 2


# --------------------------------------------------------------------------- runners


def _runner(tmp_path: Path, owner: str, sleep: float) -> CommandRunner:
    code = (
        "import json, os, sys, time; time.sleep(float(sys.argv[2])); "
        "metrics = json.dumps(dict(x=os.getpid())); "
        "open(os.path.join(sys.argv[1], 'metrics.json'), 'w').write(metrics)"
    )
    return CommandRunner(
        (sys.executable, "-c", code, "{out}", str(sleep)), tmp_path, ("x",), owner=owner
    )


def test_two_writers_of_one_run_both_end_with_the_run_that_landed_first(tmp_path: Path) -> None:
    job = Job("k", {"seed": 0}, 0, tmp_path / "runs" / "k")
    outcomes: list[Outcome] = []
    writers = [
        threading.Thread(target=lambda o=o: outcomes.append(_runner(tmp_path, o, 0.3)(job)))
        for o in ("1" * 16, "2" * 16)
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert [o.error for o in outcomes] == [None, None]
    landed = json.loads((job.run_dir / "metrics.json").read_text())
    assert [o.metrics for o in outcomes] == [landed, landed]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["k"]


def test_a_run_whose_folder_is_removed_fails_without_a_traceback(tmp_path: Path) -> None:
    runner = _runner(tmp_path, "1" * 16, 1.0)
    job = Job("k", {"seed": 0}, 0, tmp_path / "runs" / "k")
    (tmp_path / "runs").mkdir()

    def remove_it() -> None:
        while not list((tmp_path / "runs").glob(".k.tmp-*")):
            time.sleep(0.01)
        time.sleep(0.2)
        remove_partial_runs(tmp_path / "runs", frozenset)  # an engine from before this fix

    remover = threading.Thread(target=remove_it)
    remover.start()
    outcome = runner(job)
    remover.join()
    assert outcome.metrics is None and "was removed by another process" in (outcome.error or "")
    assert not (tmp_path / "runs" / "k").exists()


# --------------------------------------------------------------------------- shared store


@pytest.mark.slow
@pytest.mark.parametrize("folders", ["one --out", "two --out"])
def test_two_engines_share_a_postgres_store(tmp_path: Path, folders: str) -> None:
    with pg_schema_url() as url:
        round_file, log, gate = gated_round(tmp_path, store=url)
        out_a = tmp_path / "out"
        out_b = out_a if folders == "one --out" else tmp_path / "out-b"
        first = Engine(round_file, out_a, tmp_path / "first.log")
        second = None
        try:
            # The second starts while the first is writing runs: its start-up spares them, and
            # it finds them claimed (its first batch has begun: it waits for them).
            first.wait_for(lambda: bool(partial_runs(out_a / "runs")), "started a run")
            writing = partial_runs(out_a / "runs")
            second = Engine(round_file, out_b, tmp_path / "second.log")
            second.wait_for(lambda: "batch 0 (screening)" in second.output, "began batch 0")
            assert all(p.is_dir() for p in writing)
        finally:
            gate.touch()
            codes = [first.finish()] + ([second.finish()] if second else [])
        for code, output in codes:
            assert code == 0, output
            assert "Traceback" not in output and "run failed" not in output, output
        counts = log_counts(log)
        assert set(counts.values()) == {1}  # no run trained twice
        with RunStore(url, reset_stale=False) as store:
            runs = store.runs()
            assert {r.status for r in runs} == {"done"}
            assert len({r.key for r in runs}) == len(runs) == len(counts)
            assert store.live_owners() == set()  # both engines removed their leases
        a = json.loads((out_a / "decision.json").read_text())
        b = json.loads((out_b / "decision.json").read_text())
        assert (a["selected"], a["shelved"]) == (b["selected"], b["shelved"])
        assert a["runs"]["total"] == b["runs"]["total"] == len(runs)
        assert a["runs"]["executed"] + a["runs"]["reused"] == len(runs)
        for out in {out_a, out_b}:
            assert not list((out / "runs").glob(".*.tmp-*"))
