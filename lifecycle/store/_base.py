"""What every part of the store shares: the database engine, read connections, unique inserts, deadlock retries."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from lifecycle.clock import Clock, SystemClock
from lifecycle.errors import AlreadyExists, InvalidInput
from lifecycle.store.db import connect

__all__ = ["Database", "StoreBase", "retry_on_deadlock"]

_RETRYABLE_SQLSTATES = {"40P01", "40001"}  # deadlock detected, serialization failure
_RETRIES = 5

F = TypeVar("F", bound=Callable[..., Any])


def retry_on_deadlock(method: F) -> F:
    """Re-run a write transaction aborted for a deadlock or serialization failure, or lost with its connection.

    Safe because every write is a compare-and-swap: if the other transaction
    committed first, the retry finds the row changed and raises Conflict. A
    connection that died under one of the transaction's statements (a server
    restart, a dropped link) committed nothing, so the write is run again
    once, on a fresh connection; one that died at the COMMIT may have
    committed, and is not retried.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        reconnected = False
        for attempt in range(_RETRIES):
            try:
                return method(*args, **kwargs)
            except OperationalError as exc:
                if _lost_before_commit(exc) and not reconnected:
                    reconnected = True
                    continue
                if getattr(exc.orig, "sqlstate", None) not in _RETRYABLE_SQLSTATES or attempt == _RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


def _lost_before_commit(exc: OperationalError) -> bool:
    """Whether the connection died under a statement (SQLAlchemy names it; a COMMIT's failure has none)."""
    return bool(exc.connection_invalidated) and exc.statement is not None


class Database:
    """One database: its engine, the task lease length, the clock, and how reads are run."""

    def __init__(self, url: str, *, lease_seconds: float = 60.0, clock: Clock | None = None) -> None:
        self.url = url
        self.engine = connect(url)
        self.lease = timedelta(seconds=lease_seconds)
        self.clock: Clock = clock or SystemClock()
        """Where every time the store writes or compares with comes from (:mod:`lifecycle.clock`)."""
        self.read_options: dict[str, object] = {"readonly": True}
        self.one_statement = self.engine.dialect.name == "postgresql"
        """Whether a task's state writes go as one statement each (:mod:`lifecycle.store._pg`)."""
        if self.engine.dialect.name == "postgresql":
            # Under READ COMMITTED each statement reads its own snapshot anyway: a BEGIN and a ROLLBACK
            # around a read are two round trips that buy nothing (bench/storm.py: 6 of 40 per operation).
            self.read_options["isolation_level"] = "AUTOCOMMIT"

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()


class StoreBase:
    """A repository of one noun over a shared :class:`Database`, with the helpers every repository uses."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine of the database."""
        return self.db.engine

    @property
    def lease(self) -> timedelta:
        """How long a task's lease lasts."""
        return self.db.lease

    @property
    def clock(self) -> Clock:
        """Where every time the store writes or compares with comes from (:mod:`lifecycle.clock`)."""
        return self.db.clock

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect().execution_options(**self.db.read_options) as conn:
            yield conn

    def _insert_unique(self, table: sa.Table, values: dict[str, Any], kind: str, name: str) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(table), values)
        except IntegrityError as exc:
            with self._read() as conn:
                taken = conn.execute(sa.select(table.c.name).where(table.c.name == name)).first() is not None
            if taken:
                raise AlreadyExists(kind, name) from None
            # Another constraint refused the row: say which, in the database's own words.
            raise InvalidInput(f"cannot add {kind} {name!r}: {exc.orig}") from exc
