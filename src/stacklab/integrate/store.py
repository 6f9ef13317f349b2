"""The run store: every training run of an integration round, in one database.

Runs are content-addressed: a run's key is a hash of its recipe hash and seed, and the key is
unique, so an identical recipe+seed is stored (and trained) once, whichever round or design
point asks for it first. Asking again returns the existing row, finished or not.

A run moves pending -> running -> done | failed. The database is the round's memory: kill the
process at any point, start it again, and `reset_stale` (run when a store is opened) puts the
runs that were `running` back to `pending`; finished runs are never repeated.

SQLite (one file in the round directory) is the default and serves several worker processes
on one machine: WAL journal, a busy timeout, and every transaction begun IMMEDIATE, so a
claim (read pending rows, mark them running) holds the write lock from its first read and two
processes never claim the same run. For many machines, give a PostgreSQL URL: claims then
lock rows with `FOR UPDATE SKIP LOCKED`, and each row is switched only if still pending.

Several processes: only the coordinator should open the store with `reset_stale=True` (the
default). A worker that joins a live round must pass `reset_stale=False`, or it would hand
back to `pending` the runs that other live workers are training.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from stacklab.errors import StacklabError
from stacklab.recipe import canonical_hash

Status = Literal["pending", "running", "done", "failed"]
STATUSES: tuple[Status, ...] = ("pending", "running", "done", "failed")


class StoreError(StacklabError):
    """A run store operation was asked for something the store does not hold or allow."""


def run_key(recipe_hash: str, seed: int) -> str:
    """The content address of a run: the same recipe and seed always give the same key."""
    return canonical_hash({"recipe": recipe_hash, "seed": seed})


class _UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as naive UTC (SQLite keeps no zone) and read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class _Base(DeclarativeBase):
    pass


class RunRow(_Base):
    """The `runs` table. Use `RunStore`, which hands out `Run` snapshots, not these rows."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(f"status IN ({', '.join(repr(s) for s in STATUSES)})", name="runs_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    recipe_hash: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    subset: Mapped[list[str]] = mapped_column(JSON)
    round: Mapped[str] = mapped_column(String(200), index=True)
    batch: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True, default="pending")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, nullable=True)
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)


@dataclasses.dataclass(frozen=True)
class Run:
    """A snapshot of one row: safe to keep after the store's session has moved on."""

    id: int
    key: str
    recipe_hash: str
    seed: int
    subset: tuple[str, ...]
    round: str
    batch: int
    status: Status
    metrics: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    recipe: dict[str, Any]

    @classmethod
    def _of(cls, row: RunRow) -> Run:
        values = {f.name: getattr(row, f.name) for f in dataclasses.fields(cls)}
        values["subset"] = tuple(row.subset)
        return cls(**values)


def _now() -> datetime:
    return datetime.now(UTC)


class RunStore:
    """Runs of integration rounds in a database at `url` (e.g. `sqlite:///round/runs.db`)."""

    def __init__(self, url: str, *, reset_stale: bool = True, busy_timeout_s: float = 60.0):
        sqlite = url.startswith("sqlite")
        self.engine: Engine = create_engine(
            url, connect_args={"timeout": busy_timeout_s} if sqlite else {}
        )
        if sqlite:
            _sqlite_for_many_processes(self.engine, busy_timeout_s)
        _create_tables(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        if reset_stale:
            self.reset_stale()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        recipe_hash: str,
        seed: int,
        subset: Iterable[str],
        round: str,
        batch: int,
        recipe: dict[str, Any],
    ) -> Run:
        """The run of this recipe and seed: the existing one, or a new pending one.

        An existing run is returned unchanged, whatever its round, batch, subset or status:
        its `subset` is the one it was first requested for, so callers map their own design
        points to run keys rather than reading them back from the rows.
        """
        key = run_key(recipe_hash, seed)
        with self._session() as session:
            row = session.scalar(select(RunRow).where(RunRow.key == key))
            if row is not None:
                return Run._of(row)
            row = RunRow(
                key=key,
                recipe_hash=recipe_hash,
                seed=seed,
                subset=sorted(subset),
                round=round,
                batch=batch,
                status="pending",
                attempts=0,
                created_at=_now(),
                recipe=recipe,
            )
            session.add(row)
            try:
                session.commit()
            except IntegrityError:  # another process created it between our read and write
                session.rollback()
                row = session.scalars(select(RunRow).where(RunRow.key == key)).one()
            return Run._of(row)

    def claim_pending(self, limit: int, keys: Collection[str] | None = None) -> list[Run]:
        """Mark up to `limit` pending runs (oldest first) running, and return them; with
        `keys`, only runs among those (a store shared by several rounds holds other rounds'
        pending runs, which are not this caller's to run).

        Safe across processes: no run is handed to two claimers (see the module docstring).
        """
        claimed = []
        with self._session() as session:
            query = select(RunRow.id).where(RunRow.status == "pending")
            if keys is not None:
                query = query.where(RunRow.key.in_(list(keys)))
            ids = session.scalars(
                query.order_by(RunRow.id).limit(limit).with_for_update(skip_locked=True)
            ).all()
            now = _now()
            for run_id in ids:
                result = session.execute(
                    update(RunRow)
                    .where(RunRow.id == run_id, RunRow.status == "pending")
                    .values(status="running", started_at=now, attempts=RunRow.attempts + 1)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(run_id)
            rows = session.scalars(
                select(RunRow).where(RunRow.id.in_(claimed)).order_by(RunRow.id)
            ).all()
            session.commit()
            return [Run._of(row) for row in rows]

    def finish(self, key: str, metrics: dict[str, Any]) -> Run:
        """Record a run's metrics. A finished run is never overwritten."""
        return self._close_run(key, status="done", metrics=metrics, error=None)

    def fail(self, key: str, error: str) -> Run:
        """Record why a run failed (`retry_failed` can queue it again)."""
        return self._close_run(key, status="failed", metrics=None, error=error)

    def _close_run(
        self, key: str, status: Status, metrics: dict[str, Any] | None, error: str | None
    ) -> Run:
        with self._session() as session:
            row = self._row(session, key)
            if row.status == "done":
                raise StoreError(f"run {key} is already done; its metrics are kept")
            # From `pending` too: a result that arrives after its run was reset is not lost.
            row.status, row.metrics, row.error, row.finished_at = status, metrics, error, _now()
            session.commit()
            return Run._of(row)

    def reset_stale(self) -> int:
        """Put runs left `running` (by a killed process) back to `pending`; return how many.

        Run when a store is opened with `reset_stale=True`: only correct while no other live
        process is training runs from this database.
        """
        with self._session() as session:
            result = session.execute(
                update(RunRow)
                .where(RunRow.status == "running")
                .values(status="pending", started_at=None)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            return int(result.rowcount)  # type: ignore[attr-defined]

    def retry_failed(self, max_attempts: int) -> int:
        """Queue failed runs that have had fewer than `max_attempts` attempts; return how many."""
        with self._session() as session:
            result = session.execute(
                update(RunRow)
                .where(RunRow.status == "failed", RunRow.attempts < max_attempts)
                .values(status="pending", started_at=None, finished_at=None)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            return int(result.rowcount)  # type: ignore[attr-defined]

    def runs(self, round: str | None = None, status: Status | None = None) -> list[Run]:
        """Runs in creation order, optionally only those created in `round` or in `status`."""
        query = select(RunRow).order_by(RunRow.id)
        if round is not None:
            query = query.where(RunRow.round == round)
        if status is not None:
            query = query.where(RunRow.status == status)
        with self._session() as session:
            return [Run._of(row) for row in session.scalars(query)]

    def get(self, key: str) -> Run | None:
        with self._session() as session:
            row = session.scalar(select(RunRow).where(RunRow.key == key))
            return None if row is None else Run._of(row)

    @staticmethod
    def _row(session: Session, key: str) -> RunRow:
        row = session.scalar(select(RunRow).where(RunRow.key == key))
        if row is None:
            raise StoreError(f"no run with key {key}")
        return row


# Any fixed number: the PostgreSQL advisory lock that stores take while creating the tables.
_CREATE_LOCK = 0x737461636B6C6162  # "stacklab"


def _create_tables(engine: Engine) -> None:
    """Create the tables if missing, one process at a time.

    PostgreSQL does not serialise `CREATE TABLE IF NOT EXISTS`-style checks: stores opened at
    once on a new database race, and all but one fail ("relation already exists" or a unique
    violation in pg_type). A transaction-scoped advisory lock makes the others wait, then see
    the tables (DDL is transactional there). SQLite's IMMEDIATE transaction already serialises.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK})
        _Base.metadata.create_all(conn)


def _sqlite_for_many_processes(engine: Engine, busy_timeout_s: float) -> None:
    """WAL (readers never block the writer) and IMMEDIATE transactions (no lock upgrades).

    A deferred SQLite transaction that reads, then writes after another process committed,
    fails at once with "database is locked" whatever the busy timeout; taking the write lock
    at BEGIN makes such transactions wait their turn instead. Switching a new file to WAL can
    fail the same way when several processes open it at once (the busy handler does not
    cover it), so the switch is skipped once the file is in WAL and retried until the busy
    timeout otherwise.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_conn.cursor()
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
