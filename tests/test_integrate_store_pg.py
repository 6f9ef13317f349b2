"""The run store on a real PostgreSQL server: the behaviours SQLite cannot show.

Give a database these tests may use in STACKLAB_TEST_PG_URL, as a SQLAlchemy URL such as
`postgresql+psycopg://postgres@127.0.0.1:55432/stacklab_test` (`bash .ci/postgres.sh` starts a
throwaway server and prints one; the driver is `pip install "psycopg[binary]"`). Unset, these
tests skip; with STACKLAB_REQUIRE_PG=1 they fail instead. Each test works in a schema of its
own, dropped afterwards. The store's general behaviours (tests/test_integrate_store.py) run
on this server too: that module's store URL is parametrized over SQLite and PostgreSQL.

SQLite serialises every claim behind one write lock; PostgreSQL lets claimers run side by
side, so here the row locks (`FOR UPDATE SKIP LOCKED`), the unique key under racing inserts,
table creation by stores opened at once, and timestamps under a session time zone other than
UTC are what keep runs from being trained twice or misdated.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from stacklab.integrate.store import Run, RunRow, RunStore, run_key

URL_VAR = "STACKLAB_TEST_PG_URL"
REQUIRE_VAR = "STACKLAB_REQUIRE_PG"


@functools.cache
def _reachable(url: str) -> str | None:
    """Why the server at `url` cannot be used, or None (asked once per test session)."""
    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # a missing driver, a wrong URL, a server that is down
        first = str(error).splitlines()[0] if str(error) else ""
        return f"{type(error).__name__}: {first}"
    return None


def pg_server_url() -> str:
    """The server's URL from the environment; skip the test when none is given.

    A URL that is given but does not work fails the test: someone asked for this server.
    """
    url = os.environ.get(URL_VAR, "")
    if not url:
        reason = f"{URL_VAR} is not set (`bash .ci/postgres.sh` starts a server and prints one)"
        if os.environ.get(REQUIRE_VAR) == "1":
            pytest.fail(f"{REQUIRE_VAR}=1 but {reason}")
        pytest.skip(reason)
    problem = _reachable(url)
    if problem is not None:
        hint = ' (driver: pip install "psycopg[binary]")' if "psycopg" in problem else ""
        pytest.fail(f"{URL_VAR} is set but the server cannot be used: {problem}{hint}")
    return url


def with_settings(url: str, **settings: str) -> str:
    """`url` whose connections start with these server settings (libpq `options`)."""
    parsed = make_url(url)
    options = [parsed.query["options"]] if parsed.query.get("options") else []
    options += [f"-c {name}={value}" for name, value in settings.items()]
    with_options = parsed.update_query_dict({"options": " ".join(options)})
    return with_options.render_as_string(hide_password=False)


@contextmanager
def pg_schema_url() -> Iterator[str]:
    """A URL whose connections work in a new, empty schema, dropped on exit.

    The schema rides in the URL (a search_path setting), so other processes, and the engine
    given the URL as a round's `store`, land in it too.
    """
    server = pg_server_url()
    schema = f"stacklab_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield with_settings(server, search_path=schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))  # a leaked lock: fail, not hang
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def url() -> Iterator[str]:
    with pg_schema_url() as schema_url:
        yield schema_url


def ask(store: RunStore, recipe: str, seed: int = 0) -> Run:
    """Request the run of a stand-in recipe whose hash is its name."""
    return store.request(recipe, seed, [], "r1", 0, {"name": recipe})


def spawn_all(
    target: Any, args: list[tuple[Any, ...]], release: Callable[[Any], None] | None = None
) -> list[Any]:
    """Run `target(*a, go, results)` in one fresh process per `a`; return what each put on
    `results`. Without `release`, `go` is a barrier: the processes start at once. With it,
    `go` is an event, and `release(go)` runs here while they wait for it."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Barrier(len(args)) if release is None else ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, go, results)) for a in args]
    for p in procs:
        p.start()
    try:
        if release is not None:
            release(go)
        out = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return out


def wait_for_lock_waiters(url: str, count: int, timeout_s: float = 30.0) -> None:
    """Return once `count` sessions of this database are waiting for a lock."""
    engine = create_engine(url)
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with engine.connect() as conn:
                if conn.execute(query).scalar_one() >= count:
                    return
            assert time.monotonic() < deadline, f"{count} sessions never queued for a lock"
            time.sleep(0.05)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- row locks


def test_a_claim_skips_runs_locked_by_another_transaction(url: str) -> None:
    # lock_timeout: a claim that waited for the lock instead of skipping it fails, not hangs.
    url = with_settings(url, lock_timeout="5s")
    with RunStore(url) as store:
        keys = [ask(store, f"h{i}").key for i in range(3)]
        holder = create_engine(url)
        with holder.connect() as conn:  # another claimer, mid-transaction, holds the oldest run
            conn.execute(text("SELECT id FROM runs WHERE key = :k FOR UPDATE"), {"k": keys[0]})
            start = time.perf_counter()
            assert [r.key for r in store.claim_pending(1)] == [keys[1]]
            assert store.claim_pending(5, keys=[keys[0]]) == []
            assert [r.key for r in store.claim_pending(5)] == [keys[2]]
            assert time.perf_counter() - start < 2.0  # skipped at once, never waited for
            conn.rollback()
        holder.dispose()
        assert [(r.key, r.attempts) for r in store.claim_pending(5)] == [(keys[0], 1)]


def _claim_until_empty(url: str, worker: int, go: Any, results: Any) -> None:
    store = RunStore(url, reset_stale=False)
    go.wait()
    mine = []
    while batch := store.claim_pending(1 + worker % 3):
        for run in batch:
            store.finish(run.key, {"worker": float(worker)})
            mine.append(run.key)
        time.sleep(0.02)  # a training run's worth of pause: the claimers interleave
    store.close()
    results.put((worker, mine))


def test_four_processes_claim_fifty_runs_each_exactly_once(url: str) -> None:
    with RunStore(url) as store:
        keys = {ask(store, f"h{i}").key for i in range(50)}
    claimed = dict(spawn_all(_claim_until_empty, [(url, w) for w in range(4)]))
    flat = [k for mine in claimed.values() for k in mine]
    assert len(flat) == len(set(flat)) == 50 and set(flat) == keys
    assert sum(1 for mine in claimed.values() if mine) >= 2  # it was a contest
    with RunStore(url) as store:
        runs = store.runs()
    assert {(r.status, r.attempts) for r in runs} == {("done", 1)}
    by_worker = {k: float(w) for w, mine in claimed.items() for k in mine}
    assert all(r.metrics == {"worker": by_worker[r.key]} for r in runs)  # its claimer's result


# --------------------------------------------------------------------------- racing writers


def _open_and_request(url: str, go: Any, results: Any) -> None:
    go.wait()
    try:
        store = RunStore(url, reset_stale=False)
        results.put({h: ask(store, h).id for h in (f"h{i}" for i in range(10))})
        store.close()
    except Exception as error:  # reported, so the assertion shows it
        results.put(f"{type(error).__name__}: {str(error).splitlines()[0]}")


def test_stores_opened_while_another_creates_the_tables(url: str) -> None:
    """Engines started at once on an empty database: while one is creating the tables, the
    others wait for it (unserialised, they fail: "relation runs already exists" or a
    duplicate key in pg_type), then use the tables it made."""
    create_all = RunRow.metadata.create_all

    def release(go: Any) -> None:
        def create_then_hold(conn: Any, **kwargs: Any) -> None:
            create_all(conn, **kwargs)  # not committed yet: the others' checks cannot see it
            go.set()
            wait_for_lock_waiters(url, 3)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RunRow.metadata, "create_all", create_then_hold)
            RunStore(url).close()

    seen = spawn_all(_open_and_request, [(url,)] * 3, release)
    assert all(isinstance(ids, dict) for ids in seen), seen
    assert all(ids == seen[0] for ids in seen)
    with RunStore(url) as store:
        assert [r.id for r in store.runs()] == list(seen[0].values())


def test_racing_requests_store_each_run_once(url: str) -> None:
    """Processes that ask for a run another one is inserting right then get that run: their
    own insert of the same key fails, and they read the row that won."""
    with RunStore(url) as store, Session(store.engine) as session:
        winner = RunRow(
            key=run_key("h0", 0), recipe_hash="h0", seed=0, subset=[], round="r0", batch=0,
            status="pending", attempts=0, created_at=datetime.now(UTC), recipe={"name": "h0"},
        )  # fmt: skip
        session.add(winner)
        session.flush()  # inserted, not committed: the others' reads miss it, their inserts wait

        def release(go: Any) -> None:
            go.set()
            wait_for_lock_waiters(url, 3)
            session.commit()

        seen = spawn_all(_open_and_request, [(url,)] * 3, release)
        assert all(isinstance(ids, dict) for ids in seen), seen
        assert all(ids == seen[0] for ids in seen)
        assert seen[0]["h0"] == winner.id
        runs = store.runs()
    assert [r.key for r in runs] == [run_key(f"h{i}", 0) for i in range(10)]
    assert runs[0].round == "r0"  # the winner's row, unchanged


# --------------------------------------------------------------------------- time zones


def test_timestamps_are_utc_whatever_the_session_time_zone(url: str) -> None:
    before = datetime.now(UTC)
    with RunStore(with_settings(url, TimeZone="Asia/Tokyo")) as store:
        key = ask(store, "h").key
        store.claim_pending(1)
        done = store.finish(key, {"x": 1.0})
    after = datetime.now(UTC)
    # The same rows, read by a session in another time zone, 16 hours behind the writer's.
    with RunStore(with_settings(url, TimeZone="America/Los_Angeles"), reset_stale=False) as store:
        again = store.get(key)
        with store.engine.connect() as conn:
            zone = conn.execute(text("SHOW TimeZone")).scalar()
            raw = conn.execute(text("SELECT created_at, started_at, finished_at FROM runs")).one()
    assert zone == "America/Los_Angeles"
    assert again == done
    stamps = (done.created_at, done.started_at, done.finished_at)
    assert all(t is not None and t.tzinfo is UTC for t in stamps)
    assert before <= stamps[0] <= stamps[1] <= stamps[2] <= after  # type: ignore[operator]
    # Stored as UTC wall time, not as either session's local time.
    assert tuple(raw) == tuple(t.replace(tzinfo=None) for t in stamps if t is not None)


# --------------------------------------------------------------------------- a whole round


@pytest.mark.slow
def test_a_round_on_postgres_resumes_after_sigkill_to_the_same_decision(
    tmp_path: Path, url: str
) -> None:
    """The engine with `store: <this server>`, killed mid-screening and started again, decides
    what an uninterrupted round on SQLite decides, and trains no finished run twice; a second
    round on the same store reuses every run."""
    from integrate_sim.scenarios import small, write_round
    from stacklab.integrate.engine import integrate
    from test_integrate_simulation import (
        comparable,
        config_and_seed,
        log_counts,
        quiet,
        read_decision,
        run_engine,
    )

    reference = integrate(
        write_round(tmp_path / "ref" / "round", small(), budget=80), tmp_path / "ref" / "out",
        console=quiet(),
    ).decision  # fmt: skip

    scenario = small()
    log = tmp_path / "runs.log"
    scenario.extra["kill_engine_after"] = 7
    round_file = write_round(tmp_path / "round", scenario, budget=80, log=log, store=url)
    out = tmp_path / "out"
    assert run_engine(round_file, out) == -9  # killed by the 7th finished run
    with RunStore(url, reset_stale=False) as store:
        done_before = {config_and_seed(r) for r in store.runs(status="done")}
        assert store.runs(status="running")  # the killed engine's runs in flight
    assert 0 < len(done_before) < reference.runs.total

    assert run_engine(round_file, out) == 0
    resumed = read_decision(out)
    assert comparable(resumed) == comparable(reference)
    counts = log_counts(log)
    assert all(counts[k] == 1 for k in done_before)  # no finished run trained again
    with RunStore(url) as store:
        assert {config_and_seed(r) for r in store.runs(status="done")} == set(counts)
        assert store.runs(status="running") == store.runs(status="pending") == []
    assert not (out / "runs.db").exists()  # the runs went to PostgreSQL, not the default

    second = write_round(tmp_path / "second", small(), budget=80, log=log, store=url, name="b")
    b = integrate(second, tmp_path / "out2", console=quiet()).decision
    assert (b.runs.executed, b.runs.reused) == (0, resumed.runs.total)
    assert (b.selected, b.shelved) == (resumed.selected, resumed.shelved)
    assert sum(log_counts(log).values()) == sum(counts.values())
