"""The run store: content addressing, claims, failures, resuming after a kill, many writers."""

import multiprocessing
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from stacklab.errors import StacklabError
from stacklab.integrate.store import RunStore, StoreError, run_key
from test_integrate_store_pg import pg_schema_url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every test on SQLite, and on the PostgreSQL server in STACKLAB_TEST_PG_URL where one is
    given (a schema of its own per test; see test_integrate_store_pg.py)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'runs.db'}"
    else:
        with pg_schema_url() as pg_url:
            yield pg_url


def ask(store: RunStore, recipe: str, seed: int = 0, round: str = "r1", subset: Any = ()) -> Any:
    """Request the run of a stand-in recipe whose hash is its name."""
    return store.request(recipe, seed, list(subset), round, 0, {"name": recipe})


def test_content_addressed_across_rounds(url: str) -> None:
    with RunStore(url) as store:
        first = store.request("h1", 0, ["b", "a"], "r1", 3, {"name": "x", "optim": {"lr": 0.1}})
        assert first.key == run_key("h1", 0)
        assert (first.status, first.attempts, first.metrics, first.error) == (
            "pending",
            0,
            None,
            None,
        )
        assert first.subset == ("a", "b")
        assert first.recipe == {"name": "x", "optim": {"lr": 0.1}}
        assert first.created_at.tzinfo is UTC
        again = store.request("h1", 0, ["c"], "r2", 0, {"name": "other"})
        assert again == first  # the existing row, unchanged: first round, subset and recipe
        other_seed = ask(store, "h1", seed=1, round="r2")
        other_recipe = ask(store, "h2", round="r2")
        assert len({first.key, other_seed.key, other_recipe.key}) == 3
        assert [r.key for r in store.runs()] == [first.key, other_seed.key, other_recipe.key]
        assert [r.key for r in store.runs(round="r2")] == [other_seed.key, other_recipe.key]
        assert store.get(first.key) == first
        assert store.get("nope") is None


def test_claim_finish_fail(url: str) -> None:
    with RunStore(url) as store:
        keys = [ask(store, f"h{i}").key for i in range(3)]
        claimed = store.claim_pending(2)
        assert [r.key for r in claimed] == keys[:2]
        assert all(r.status == "running" and r.attempts == 1 and r.started_at for r in claimed)
        assert [r.key for r in store.claim_pending(5)] == keys[2:]
        assert store.claim_pending(5) == []

        done = store.finish(keys[0], {"val_bpb": 1.25, "acc": 0.5})
        assert (done.status, done.metrics, done.error) == (
            "done",
            {"val_bpb": 1.25, "acc": 0.5},
            None,
        )
        assert done.finished_at is not None and done.finished_at >= done.started_at
        failed = store.fail(keys[1], "CUDA out of memory")
        assert (failed.status, failed.error, failed.metrics) == (
            "failed",
            "CUDA out of memory",
            None,
        )
        assert store.get(keys[1]) == failed

        with pytest.raises(StoreError, match="already done"):
            store.finish(keys[0], {"val_bpb": 9.0})
        with pytest.raises(StoreError, match="already done"):
            store.fail(keys[0], "late")
        assert store.get(keys[0]).metrics == {"val_bpb": 1.25, "acc": 0.5}
        with pytest.raises(StacklabError, match="no run with key nope"):
            store.finish("nope", {})
        assert [r.key for r in store.runs(status="running")] == [keys[2]]

        # A failed run goes back to the queue while it has attempts left.
        assert store.retry_failed(max_attempts=1) == 0
        assert store.retry_failed(max_attempts=2) == 1
        again = store.claim_pending(5)
        assert [(r.key, r.attempts) for r in again] == [(keys[1], 2)]


def test_resume_after_kill(url: str) -> None:
    killed = RunStore(url)
    keys = [ask(killed, f"h{i}").key for i in range(4)]
    killed.claim_pending(3)
    done = killed.finish(keys[0], {"loss": 2.0})
    # The process dies here: keys 1 and 2 stay `running`, key 3 `pending`, nothing is closed.
    assert [r.status for r in killed.runs()] == ["done", "running", "running", "pending"]

    with RunStore(url) as resumed:
        runs = resumed.runs()
        assert [r.status for r in runs] == ["done", "pending", "pending", "pending"]
        assert runs[0] == done  # finished runs are untouched
        assert [r.started_at for r in runs[1:]] == [None, None, None]
        assert [r.attempts for r in runs] == [1, 1, 1, 0]
        again = resumed.claim_pending(10)
        assert [r.key for r in again] == keys[1:]  # never the finished one
        assert ask(resumed, "h0").status == "done"  # re-requesting it does not re-queue it
    killed.close()


def test_two_stores_on_one_file(url: str) -> None:
    with RunStore(url) as a, RunStore(url, reset_stale=False) as b:
        first = ask(a, "h1", round="r1")
        assert ask(b, "h1", round="r2") == first
        ask(b, "h2")
        claimed_a = a.claim_pending(1)
        claimed_b = b.claim_pending(5)
        assert [r.key for r in claimed_a] == [first.key]
        assert [r.key for r in claimed_b] == [run_key("h2", 0)]
        b.finish(first.key, {"x": 1.0})
        assert a.get(first.key).metrics == {"x": 1.0}
    # Opening with reset_stale=True (the default) hands running runs back: coordinator only.
    with RunStore(url) as c:
        assert c.get(run_key("h2", 0)).status == "pending"


def _claim_all(url: str, barrier: Any, results: Any) -> None:
    store = RunStore(url, reset_stale=False)
    barrier.wait()
    mine = []
    while batch := store.claim_pending(2):
        for run in batch:
            store.finish(run.key, {"pid": 0.0})
            mine.append(run.key)
    store.close()
    results.put(mine)


@pytest.mark.slow
def test_concurrent_claims_never_share_a_run(url: str) -> None:
    with RunStore(url) as store:
        keys = {ask(store, f"h{i}").key for i in range(40)}
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(url, barrier, results)) for _ in range(2)]
    for w in workers:
        w.start()
    # The third claimer is a thread of this process, with its own store and connection.
    thread = threading.Thread(target=_claim_all, args=(url, barrier, results))
    thread.start()
    claimed = [results.get(timeout=30) for _ in range(3)]
    thread.join()
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    flat = [k for mine in claimed for k in mine]
    assert len(flat) == len(set(flat)) == 40 and set(flat) == keys
    with RunStore(url) as store:
        assert {r.status for r in store.runs()} == {"done"}
        assert {r.attempts for r in store.runs()} == {1}


def test_timestamps_read_back_as_utc(url: str) -> None:
    before = datetime.now(UTC)
    with RunStore(url) as store:
        key = ask(store, "h").key
    with RunStore(url) as store:
        created = store.get(key).created_at
    assert created.tzinfo is UTC and before <= created <= datetime.now(UTC)


def test_claim_pending_can_keep_to_given_keys(url: str) -> None:
    with RunStore(url) as store:
        a = store.request("h-a", 0, ["x"], "r1", 0, {"seed": 0})
        b = store.request("h-b", 0, ["y"], "r2", 0, {"seed": 0})
        assert [r.key for r in store.claim_pending(5, keys=[b.key])] == [b.key]
        assert store.get(a.key).status == "pending"
        assert store.claim_pending(5, keys=[]) == []
        assert [r.key for r in store.claim_pending(5)] == [a.key]


def test_a_finished_run_keeps_its_trainers_own_run_time(url: str) -> None:
    """`seconds` is the trainer's time, not claim to finish (a claimed run may wait)."""
    with RunStore(url) as store:
        timed, untimed = ask(store, "h1").key, ask(store, "h2").key
        store.claim_pending(2)
        assert store.finish(timed, {"m": 1.0}, seconds=12.5).seconds == 12.5
        assert store.finish(untimed, {"m": 1.0}).seconds is None
        assert store.get(timed).seconds == 12.5  # type: ignore[union-attr]


def test_a_store_from_before_run_times_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    with RunStore(url) as store:
        key = ask(store, "h1").key
        store.claim_pending(1)
        store.finish(key, {"m": 1.0}, seconds=3.0)
    with sqlite3.connect(tmp_path / "runs.db") as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN seconds")
    with RunStore(url) as store:
        run = store.get(key)
        assert run is not None and run.metrics == {"m": 1.0} and run.seconds is None
