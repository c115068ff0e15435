"""The change feed's SQL: changes in commit order, consumers' positions, retention, and audit queries.

Every audit row is a change, and its position ``(tx, id)`` orders the feed.
A reader pages with ``position > after``; it must never pass over a change
that commits later with a smaller position. How each database makes sure:

**SQLite.** Writers take the write lock at ``BEGIN IMMEDIATE`` and hold it to
``COMMIT``, so they commit one at a time and a row's id (``max(rowid) + 1`` at
its insert) grows in commit order: a reader whose snapshot holds id *n* holds
every id below it. ``tx`` is 0; the feed reads ``id > after.id`` by rowid.
Retention never deletes the newest row, so a rowid is never handed out twice.

**PostgreSQL.** Ids come from a sequence when the row is inserted, and a
transaction holding a smaller id may commit after one holding a larger: paging
by id would skip it. The feed is the transactional outbox over transaction
ids instead (migration 0012 installs the trigger):

- an insert trigger sets ``tx`` to the writer's ``pg_current_xact_id()``
  (``xid8``: 64 bits, never wraps around);
- a read returns only rows with ``tx < pg_snapshot_xmin(pg_current_snapshot())``,
  in the same statement as the scan. Every transaction with an id below the
  snapshot's xmin has ended, so every row with such a ``tx`` that will ever
  exist is already visible; and a row committed after the read has a ``tx`` at
  least its writer's id, itself at least that xmin: above every position read;
- it orders by ``(tx, id)``, so a position is that pair, and paging by it
  skips nothing;
- one instance's changes commit one after another (each compare-and-swap
  UPDATE waits on the instance's row lock), but a transaction may have taken
  its id before the previous change committed (it wrote something else first).
  The trigger therefore takes ``GREATEST(own id, the instance's latest tx)``:
  still at least the writer's id, so the argument above holds, and never below
  the instance's previous change, so the feed keeps each instance's order;
- the trigger also sends ``NOTIFY lifecycle_changes``, delivered at commit (and
  dropped on rollback): followers ``LISTEN`` instead of polling.

The costs, PostgreSQL: a committed change is readable once every transaction
that took an id before its writer has ended, so a long transaction anywhere in
the cluster (any database, any table) holds the feed back until it ends,
never losing anything; a follower that finds committed changes held back
re-reads every ``feed_poll_interval``. Each audit insert pays an index probe
and the NOTIFY, and PostgreSQL serialises the commits of transactions that
sent a NOTIFY (a lock taken briefly at commit). Rows inserted with the trigger
off (``session_replication_role = replica``, as on a logical replica) keep
``tx`` 0 and never reach the feed: follow the primary. On both databases the
feed's indexes cost every audit insert (``bench/changes.py`` measures it).

A follower reads on a connection of its own (on PostgreSQL in autocommit,
LISTENing, with sorts off so a page always comes off ``ix_audit_log_feed``
in order), with a statement compiled once, on the DBAPI cursor: each row is
a :class:`Change` as it comes. What it reads, waits for and writes raises
:class:`~lifecycle.errors.DatabaseUnavailable` when the database is away, and
an exclusive follower holds its consumer's lock on that connection
(:mod:`lifecycle.store._follower`).

Audit queries (:func:`audit_select`) each read one index range: by time
(``ix_audit_log_created_at``), request (``ix_audit_log_request``), host and
cause (``ix_audit_log_host_cause``; a host alone reads one range per cause),
cause, operation, and changes into a vm_state (``ix_audit_log_entered``, a
partial index of the rows that changed it). Filters combined use one of those
indexes and check the others on the rows it yields.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.sql.compiler import SQLCompiler

from lifecycle.audit import AuditEntry, AuditQuery, Change, Position
from lifecycle.errors import DatabaseUnavailable
from lifecycle.records import Cause
from lifecycle.store._base import StoreBase
from lifecycle.store._follower import advisory_lock, file_lock, holds_advisory_lock, unavailable
from lifecycle.store._rows import AUDITS
from lifecycle.store.db import aware
from lifecycle.store.tables import FEED_CONSUMERS

__all__ = ["CHANNEL", "Feed", "Reader", "audit_select"]

CHANNEL = "lifecycle_changes"
"""The PostgreSQL notification channel the audit trigger notifies at each commit of a change."""

_A = AUDITS
_C = FEED_CONSUMERS
_PRUNE_BATCH = 10_000
"""Rows deleted per transaction by retention, so no transaction holds the log for long."""
_SLICE = 0.1
"""Longest a LISTEN wait blocks before it looks at the stop event again."""


def _xmin() -> sa.ColumnElement[int]:
    """Return the current snapshot's xmin as a bigint: every transaction with a smaller id has ended."""
    xmin = sa.func.pg_snapshot_xmin(sa.func.pg_current_snapshot())
    return sa.cast(sa.cast(xmin, sa.Text), sa.BigInteger)


_CHANGE_COLUMNS = (
    _A.c.tx,
    _A.c.id,
    _A.c.instance_uuid,
    _A.c.host,
    _A.c.from_vm_state,
    _A.c.to_vm_state,
    _A.c.from_task_state,
    _A.c.to_task_state,
    _A.c.from_power_state,
    _A.c.to_power_state,
    _A.c.task_id,
    _A.c.operation,
    _A.c.actor,
    _A.c.cause,
    _A.c.rule,
    _A.c.request_id,
    _A.c.message,
    _A.c.created_at,
    _A.c.project_id,
    _A.c.user_id,
)
"""The columns of a change in the order of :class:`Change`'s fields: a row is a change as it comes."""


def _utc(value: datetime) -> datetime:
    # SQLite stores UTC wall time without a zone: bind the same.
    return value.astimezone(UTC)


def audit_select(q: AuditQuery) -> sa.Select[Any]:
    """Return the query of the audit rows ``q`` admits, oldest first (see the module docstring for its index)."""
    where: list[sa.ColumnElement[bool]] = []
    if q.since is not None:
        where.append(_A.c.created_at >= _utc(q.since))
    if q.until is not None:
        where.append(_A.c.created_at < _utc(q.until))
    if q.request_id is not None:
        where.append(_A.c.request_id == q.request_id)
    if q.host is not None:
        where.append(_A.c.host == q.host)
        if q.cause is None:  # one range of ix_audit_log_host_cause per cause, not the host's whole history
            where.append(_A.c.cause.in_([c.value for c in Cause]))
    if q.cause is not None:
        where.append(_A.c.cause == q.cause.value)
    if q.operation is not None:
        where.append(_A.c.operation == q.operation)
    if q.vm_state is not None:
        where += [_A.c.to_vm_state == q.vm_state.value, _A.c.from_vm_state.is_distinct_from(_A.c.to_vm_state)]
    return sa.select(_A).where(*where).order_by(_A.c.created_at, _A.c.id).limit(q.limit)


_INDEXED = _A.c.tx > sa.literal_column("0", sa.BigInteger)
"""The predicate of ix_audit_log_feed, written out (not a bound parameter) so the planner matches the index."""
_NO_SORT = "SET {} enable_sort = off"
"""A page of the feed must come off ix_audit_log_feed in order, LIMIT stopping the scan. On a log that just
grew, stale statistics can make PostgreSQL prefer reading every row after the position and sorting them,
each page: the follower's sessions forbid the sort."""


def _changes_statement(postgres: bool) -> sa.Select[Any]:
    """Return the query of the next ``limit`` changes after (``after_tx``, ``after_id``)."""
    after_tx, after_id = sa.bindparam("after_tx", type_=sa.BigInteger), sa.bindparam("after_id", type_=sa.BigInteger)
    if postgres:
        where = (_INDEXED, sa.tuple_(_A.c.tx, _A.c.id) > sa.tuple_(after_tx, after_id), _A.c.tx < _xmin())
        query = sa.select(*_CHANGE_COLUMNS).where(*where).order_by(_A.c.tx, _A.c.id)
    else:
        query = sa.select(*_CHANGE_COLUMNS).where(_A.c.id > after_id).order_by(_A.c.id)
    return query.limit(sa.bindparam("limit", type_=sa.Integer))


_COMPILED: dict[str, SQLCompiler] = {}


def _read_changes(conn: sa.Connection, after: Position, limit: int) -> list[Change]:
    """Read the next changes on ``conn``'s own DBAPI cursor, each row made a :class:`Change` as it comes.

    This is the feed's hot loop: SQLAlchemy compiles the statement once per dialect, and the rows skip its
    result objects, so a follower reads at the pace of a plain select (``bench/changes.py``).
    """
    dialect = conn.dialect
    postgres = dialect.name == "postgresql"
    if not postgres and after.tx > 0:  # past every SQLite row: they all have tx 0
        return []
    key = f"{dialect.name}+{dialect.driver}"  # one statement per dialect and paramstyle
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = _changes_statement(postgres).compile(dialect=dialect)
    values = compiled.construct_params({"after_tx": after.tx, "after_id": after.id, "limit": limit})
    assert values is not None
    params: Any = values if compiled.positiontup is None else [values[name] for name in compiled.positiontup]
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(compiled.string, params)
        rows = cursor.fetchall()
    finally:
        cursor.close()
    new = tuple.__new__
    if postgres:  # timestamps come aware
        return [new(Change, row) for row in rows]
    utc = datetime.fromisoformat  # SQLite keeps UTC wall time as text: parsed with its zone in one call
    return [new(Change, (*row[:17], utc(f"{row[17]}+00:00"), *row[18:])) for row in rows]


_HELD_BACK = sa.select(sa.exists().where(_INDEXED, _A.c.tx >= _xmin()))
"""PostgreSQL: is a committed change waiting for an older transaction to end?"""


class Reader(Protocol):
    """A follower's access to the feed: reads, and a wait for the next change."""

    notified: bool
    """Whether a commit wakes :meth:`wait`; otherwise only its timeout does."""

    def read(self, after: Position, limit: int) -> list[Change]:
        """Return up to ``limit`` changes after ``after``, in feed order."""

    def held_back(self) -> bool:
        """Return whether a committed change is not readable yet (an older transaction is open)."""

    def wait(self, stop: threading.Event, timeout: float) -> None:
        """Return after a commit of a change, ``timeout`` seconds, or ``stop``, whichever comes first."""

    def confirm(self) -> None:
        """Return if the reader still holds its consumer's lock (or has none); raise DatabaseUnavailable if not."""


class _PollReader:
    """SQLite: reads like any other, and a clock."""

    notified = False

    def __init__(self, feed: Feed) -> None:
        self._feed = feed

    def read(self, after: Position, limit: int) -> list[Change]:
        with unavailable(self._feed.engine.dialect):
            return self._feed.read(after, limit)

    def held_back(self) -> bool:
        return False

    def wait(self, stop: threading.Event, timeout: float) -> None:
        stop.wait(timeout)

    def confirm(self) -> None:
        """Return: an flock is held until the process closes it or dies, nothing to check."""


class _ListenReader:
    """PostgreSQL: one connection of the follower's own, in autocommit, that LISTENs and reads.

    Each read is then one round trip, its own transaction and snapshot, and a
    commit's notification arrives on the connection the next read uses.
    """

    notified = True

    def __init__(self, conn: sa.Connection, claim: str | None) -> None:
        self._conn, self._claim = conn, claim
        self._dbapi: Any = conn.connection.dbapi_connection  # psycopg's own (detached: no driver_connection)

    def read(self, after: Position, limit: int) -> list[Change]:
        with unavailable(self._conn.dialect):
            return _read_changes(self._conn, after, limit)

    def held_back(self) -> bool:
        with unavailable(self._conn.dialect):
            return bool(self._conn.execute(_HELD_BACK).scalar_one())

    def wait(self, stop: threading.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with unavailable(self._conn.dialect):  # a server gone ends the wait at once: its socket closes
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                if any(True for _ in self._dbapi.notifies(timeout=min(left, _SLICE), stop_after=1)):
                    for _ in self._dbapi.notifies(timeout=0):  # the others queued meanwhile: one read serves all
                        pass
                    return

    def confirm(self) -> None:
        """One round trip on the locking session: a session gone or a lock gone is a lost lock."""
        if self._claim is None:
            return
        with unavailable(self._conn.dialect):
            held = holds_advisory_lock(self._conn, self._claim)
        if not held:
            raise DatabaseUnavailable(f"the lock of consumer {self._claim!r} was lost", transient=True)


class Feed(StoreBase):
    """Changes read in commit order, retention, and audit queries across instances (positions: :class:`Consumers`)."""

    @property
    def _postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def read(self, after: Position, limit: int) -> list[Change]:
        """Return up to ``limit`` changes after ``after``, in feed order; none is ever passed over."""
        with self._read() as conn:
            if self._postgres:
                conn.exec_driver_sql(_NO_SORT.format("LOCAL"))
            return _read_changes(conn, after, limit)

    def held_back(self) -> bool:
        """Return whether a committed change is not readable yet (PostgreSQL: an older transaction is open)."""
        if not self._postgres:
            return False
        with self._read() as conn:
            return bool(conn.execute(_HELD_BACK).scalar_one())

    def newest(self) -> Position | None:
        """Return the position of the last change readable now (None when there is none)."""
        if self._postgres:
            query = sa.select(_A.c.tx, _A.c.id).where(_INDEXED, _A.c.tx < _xmin())
            query = query.order_by(_A.c.tx.desc(), _A.c.id.desc()).limit(1)
        else:
            query = sa.select(_A.c.tx, _A.c.id).order_by(_A.c.id.desc()).limit(1)
        with self._read() as conn:
            row = conn.execute(query).first()
        return None if row is None else Position(row.tx, row.id)

    @contextmanager
    def reader(self, claim: str | None = None) -> Iterator[Reader]:
        """Yield a follower's reader: on PostgreSQL LISTENing from before its first read, on SQLite polling.

        ``claim`` names a consumer whose lock the reader holds while it lives
        (:class:`~lifecycle.errors.ConsumerInUse` if another holder has it).
        :class:`~lifecycle.errors.DatabaseUnavailable` when the database cannot be reached.
        """
        if not self._postgres:
            if claim is None:
                yield _PollReader(self)
                return
            with file_lock(self.engine.url.database, claim):
                yield _PollReader(self)
            return
        with unavailable(self.engine.dialect):
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        conn.detach()  # a LISTENing session must never go back to the pool
        try:
            with unavailable(self.engine.dialect):
                if claim is not None:
                    advisory_lock(conn, claim)  # released with the session, however it ends
                conn.exec_driver_sql(_NO_SORT.format("SESSION"))
                conn.exec_driver_sql(f"LISTEN {CHANNEL}")
            yield _ListenReader(conn, claim)
        finally:
            with suppress(sa.exc.DBAPIError):  # a connection the server dropped has nothing left to close
                conn.close()

    def prune(self, before: datetime) -> int:
        """Delete the changes written before ``before`` that every consumer has passed; return how many.

        The newest change always stays (SQLite would hand its rowid out again).
        """
        with self._read() as conn:
            floor = conn.execute(sa.select(_C.c.tx, _C.c.seq).order_by(_C.c.tx, _C.c.seq).limit(1)).first()
            newest = conn.execute(sa.select(sa.func.max(_A.c.id))).scalar_one()
        if newest is None:
            return 0
        where = [_A.c.created_at < _utc(before), _A.c.id < newest]
        if floor is not None:
            where.append(sa.tuple_(_A.c.tx, _A.c.id) <= sa.tuple_(sa.literal(floor.tx), sa.literal(floor.seq)))
        chunk = sa.select(_A.c.id).where(*where).order_by(_A.c.created_at, _A.c.id).limit(_PRUNE_BATCH)
        pruned = 0
        while True:
            with self.engine.begin() as conn:
                ids = list(conn.execute(chunk).scalars())
                if ids:
                    conn.execute(sa.delete(_A).where(_A.c.id.in_(ids)))
            pruned += len(ids)
            if len(ids) < _PRUNE_BATCH:
                return pruned

    def audit_rows(self, q: AuditQuery) -> list[AuditEntry]:
        """Return the audit rows ``q`` admits, oldest first."""
        with self._read() as conn:
            rows = conn.execute(audit_select(q)).mappings().all()
        return [AuditEntry(**{**r, "created_at": aware(r["created_at"])}) for r in rows]
