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

Several processes: opening a store with `reset_stale=True` (the default) hands back to
`pending` every run left `running`, which is only right for a process that knows it is the
store's only user (the engine on its own round folder's SQLite file, which it locks). Anything
else opens with `reset_stale=False` and calls `reset_dead`, which hands back only the runs of
claimers that are gone. A claimer is known by its lease: a row in `leases`, named by the
store's `owner` token, renewed by a background thread every `lease_s / 4` seconds and removed
on `close`. A lease is dead when it has not been renewed for `lease_s` seconds (by the
database server's clock on PostgreSQL, so the machines' clocks need not agree), or at once when
its process, on this machine, has exited. Every claim records its claimer in `runs.owner`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    delete,
    event,
    inspect,
    or_,
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
LEASE_S = 60.0  # a claimer whose lease was not renewed for this long is taken for dead

log = logging.getLogger(__name__)


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
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the last claimer
    # Which code made the run (a tree hash, or a fingerprint of the trainer's files) and what
    # that fingerprint covered; part of the key, kept apart to say why old runs went stale.
    code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The trainer's own run time (started_at is the claim, which may wait in a queue).
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)


class LeaseRow(_Base):
    """The `leases` table: one row per live claimer (a store that has claimed runs)."""

    __tablename__ = "leases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the store's owner token
    host: Mapped[str] = mapped_column(String(255))  # where `pid` means something
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(_UTCDateTime)
    renewed_at: Mapped[datetime] = mapped_column(_UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(_UTCDateTime)


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
    owner: str | None = None  # the owner token of the store that claimed it last
    code: str | None = None  # the code fingerprint that is part of the key (None: older runs)
    provenance: dict[str, Any] | None = None  # what `code` covers (tree, files, command)
    seconds: float | None = None  # how long the trainer ran (None: not recorded)

    @classmethod
    def _of(cls, row: RunRow) -> Run:
        values = {f.name: getattr(row, f.name) for f in dataclasses.fields(cls)}
        values["subset"] = tuple(row.subset)
        return cls(**values)


def _now() -> datetime:
    return datetime.now(UTC)


class RunStore:
    """Runs of integration rounds in a database at `url` (e.g. `sqlite:///round/runs.db`)."""

    def __init__(
        self,
        url: str,
        *,
        reset_stale: bool = True,
        busy_timeout_s: float = 60.0,
        lease_s: float = LEASE_S,
    ):
        sqlite = url.startswith("sqlite")
        self.engine: Engine = create_engine(
            url, connect_args={"timeout": busy_timeout_s} if sqlite else {}
        )
        if sqlite:
            _sqlite_for_many_processes(self.engine, busy_timeout_s)
        _create_tables(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.owner = uuid.uuid4().hex[:16]  # this store's claims, leases and temporary folders
        self.lease_s = lease_s
        self._lease_lock = threading.Lock()  # one lease write at a time from this store
        self._leased = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        if reset_stale:
            self.reset_stale()

    def close(self) -> None:
        """Stop renewing the lease and remove it: runs still `running` under it are dead."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._leased:
            try:
                with self._lease_lock, self._session() as session:
                    session.execute(delete(LeaseRow).where(LeaseRow.id == self.owner))
                    session.commit()
            except Exception as exc:  # the database is gone: the lease expires on its own
                log.warning("run store: could not remove lease %s: %s", self.owner, exc)
            self._leased = False
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
        code: str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> Run:
        """The run of this recipe and seed: the existing one, or a new pending one.

        `recipe_hash` identifies everything the run depends on but the seed (the engine hashes
        the resolved config with `code`); `code` and `provenance` are stored beside it so a
        later round can say why a run of the same config no longer counts.

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
                code=code,
                provenance=provenance,
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
        with self._lease_lock, self._session() as session:
            self._renew(session)  # in the same transaction: a claim never outlives its lease
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
                    .values(
                        status="running",
                        started_at=now,
                        attempts=RunRow.attempts + 1,
                        owner=self.owner,
                    )
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(run_id)
            rows = session.scalars(
                select(RunRow).where(RunRow.id.in_(claimed)).order_by(RunRow.id)
            ).all()
            session.commit()
        self._start_beating()
        return [Run._of(row) for row in rows]

    def finish(self, key: str, metrics: dict[str, Any], seconds: float | None = None) -> Run:
        """Record a run's metrics (and how long its trainer ran). A finished run is never
        overwritten."""
        return self._close_run(key, status="done", metrics=metrics, error=None, seconds=seconds)

    def fail(self, key: str, error: str) -> Run:
        """Record why a run failed (`retry_failed` can queue it again).

        A failure is not recorded over another live claimer's attempt (this store's claim
        lapsed and the run was claimed again): the run is returned unchanged, still running.
        """
        return self._close_run(key, status="failed", metrics=None, error=error)

    def _close_run(
        self,
        key: str,
        status: Status,
        metrics: dict[str, Any] | None,
        error: str | None,
        seconds: float | None = None,
    ) -> Run:
        with self._session() as session:
            row = self._row(session, key)
            if row.status == "done":
                raise StoreError(f"run {key} is already done; its metrics are kept")
            if (
                status == "failed"
                and row.status == "running"
                and row.owner not in (None, self.owner)
                and row.owner in self._live(session)
            ):
                return Run._of(row)  # another live claimer's attempt is the one that counts
            # From `pending` too: a result that arrives after its run was reset is not lost.
            row.status, row.metrics, row.error, row.finished_at = status, metrics, error, _now()
            row.seconds = seconds
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
                .values(status="pending", started_at=None, owner=None)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            return int(result.rowcount)  # type: ignore[attr-defined]

    def reset_dead(self) -> int:
        """Put back to `pending` the runs whose claimer is gone; return how many.

        Gone: its lease expired, was removed (its store was closed) or belongs to a process
        of this machine that has exited; or the run records no claimer (a claim made before
        leases). Safe while other live processes train runs from this database.
        """
        with self._lease_lock, self._session() as session:
            self._live(session)  # drops the dead leases
            result = session.execute(
                update(RunRow)
                .where(
                    RunRow.status == "running",
                    or_(RunRow.owner.is_(None), RunRow.owner.not_in(select(LeaseRow.id))),
                )
                .values(status="pending", started_at=None, owner=None)
                .execution_options(synchronize_session=False)
            )
            session.commit()
            return int(result.rowcount)  # type: ignore[attr-defined]

    def live_owners(self) -> set[str]:
        """Owner tokens of the live claimers (this store's own among them once it claimed)."""
        with self._lease_lock, self._session() as session:
            live = self._live(session)
            session.commit()
            return live

    # ------------------------------------------------------------------ leases

    def _clock(self, session: Session) -> datetime:
        """Now, by the clock every lease is judged by: the server's on PostgreSQL (several
        machines), this machine's on SQLite (one machine)."""
        if session.get_bind().dialect.name == "postgresql":
            now = session.execute(text("SELECT timezone('utc', clock_timestamp())")).scalar_one()
            return now.replace(tzinfo=UTC)
        return _now()

    def _live(self, session: Session) -> set[str]:
        """Delete the dead leases (never this store's own); return the ids of the others."""
        now = self._clock(session)
        rows = session.execute(
            select(LeaseRow.id, LeaseRow.host, LeaseRow.pid, LeaseRow.expires_at)
        )
        here = _machine()
        dead, live = [], set()
        for lease_id, host, pid, expires_at in rows:
            gone = expires_at.replace(tzinfo=UTC) < now or (host == here and not _pid_alive(pid))
            if gone and lease_id != self.owner:
                dead.append(lease_id)
            else:
                live.add(lease_id)
        if dead:
            session.execute(delete(LeaseRow).where(LeaseRow.id.in_(dead)))
        return live

    def _renew(self, session: Session) -> None:
        """Create or extend this store's lease (in the caller's transaction)."""
        now = self._clock(session)
        expires = now + timedelta(seconds=self.lease_s)
        result = session.execute(
            update(LeaseRow)
            .where(LeaseRow.id == self.owner)
            .values(renewed_at=now, expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 0:  # type: ignore[attr-defined]  # new, or dropped as dead
            lease = LeaseRow(id=self.owner, host=_machine(), pid=os.getpid(), started_at=now)
            lease.renewed_at, lease.expires_at = now, expires
            session.add(lease)
            session.flush()
        self._leased = True

    def _start_beating(self) -> None:
        if self._beat is None and not self._stop.is_set():
            self._beat = threading.Thread(
                target=self._keep_lease, name=f"lease-{self.owner}", daemon=True
            )
            self._beat.start()

    def _keep_lease(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                with self._lease_lock, self._session() as session:
                    self._renew(session)
                    session.commit()
            except Exception as exc:  # the database is unreachable for now: try again later
                log.warning("run store: could not renew lease %s: %s", self.owner, exc)

    def retry_failed(self, max_attempts: int) -> int:
        """Queue failed runs that have had fewer than `max_attempts` attempts; return how many."""
        with self._session() as session:
            result = session.execute(
                update(RunRow)
                .where(RunRow.status == "failed", RunRow.attempts < max_attempts)
                .values(status="pending", started_at=None, finished_at=None, owner=None)
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


@functools.cache
def _machine() -> str:
    """This machine and process namespace: where a lease's pid can be checked for life.

    The host name, the kernel's boot id and the pid namespace: two containers with the same
    host name, or a machine rebooted since, never take each other's pids for their own.
    """
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)[:255]


def _pid_alive(pid: int) -> bool:
    """Is process `pid` of this machine running (a zombie, exited but not reaped, is not)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


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
        have = {c["name"] for c in inspect(conn).get_columns("runs")}
        added = (
            ("owner", "VARCHAR(32)"),
            ("code", "VARCHAR(64)"),
            ("provenance", "JSON"),
            ("seconds", "FLOAT"),
        )
        for name, sql_type in added:
            if name not in have:  # stores from before the column
                conn.execute(text(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}"))


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
