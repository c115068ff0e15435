"""What a feed follower needs besides reads: the database's errors in the feed's terms, and a consumer's lock.

**Errors.** :func:`unavailable` turns what the driver raises (through
SQLAlchemy or straight off a DBAPI cursor, as the feed's hot loop reads) into
:class:`~lifecycle.errors.DatabaseUnavailable` with the database's own message.
It is ``transient`` when a reconnect may cure it: on PostgreSQL any
``OperationalError`` (the server went away, restarts, refuses connections,
ran out of them) and any connection SQLAlchemy found dead; on SQLite only a
locked or busy file. Anything else (a missing table, a syntax error) is not.

**Locks.** An exclusive follower (one webhook sender per URL) holds its
consumer's lock while it follows, and a holder that dies loses it at once:

- PostgreSQL: a session advisory lock on the follower's own LISTEN
  connection. A server restart or a dropped link releases it with the
  session; the follower checks it still holds it before each delivery
  (:func:`holds_advisory_lock`, one round trip on that session), takes it
  again when it reconnects, or stops with
  :class:`~lifecycle.errors.ConsumerInUse` if another took it meanwhile;
- SQLite: an ``flock`` on a file next to the database (``<db>.consumer-<digest>.lock``),
  which the kernel releases when the holding process dies, however it dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import sqlalchemy as sa

from lifecycle.errors import ConsumerInUse, DatabaseUnavailable

__all__ = ["advisory_lock", "file_lock", "holds_advisory_lock", "probe", "unavailable"]


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _transient(dialect: sa.Dialect, error: BaseException, invalidated: bool) -> bool:
    if invalidated or isinstance(error, sa.exc.DisconnectionError):
        return True
    if not isinstance(error, dialect.loaded_dbapi.OperationalError):
        return False
    if dialect.name == "sqlite":  # "database is locked": a writer holds it longer than the busy timeout
        return any(word in str(error).lower() for word in ("locked", "busy"))
    return True


def _mapped(dialect: sa.Dialect, error: BaseException, invalidated: bool = False) -> DatabaseUnavailable:
    reason = _one_line(str(error)) or type(error).__name__
    return DatabaseUnavailable(reason, transient=_transient(dialect, error, invalidated))


@contextmanager
def unavailable(dialect: sa.Dialect) -> Iterator[None]:
    """Raise :class:`DatabaseUnavailable` for what the database or its driver raised in the block."""
    driver_error: type[BaseException] = dialect.loaded_dbapi.Error
    try:
        yield
    except sa.exc.DBAPIError as exc:
        raise _mapped(dialect, exc.orig or exc, exc.connection_invalidated) from exc
    except sa.exc.DisconnectionError as exc:
        raise _mapped(dialect, exc) from exc
    except driver_error as exc:  # off a DBAPI cursor or connection, which SQLAlchemy does not wrap
        raise _mapped(dialect, exc) from exc


_WAITABLE = ("08", "53", "57P")
"""SQLSTATE classes a server answers a connection with that waiting may cure: connection exceptions,
insufficient resources (too many connections), operator intervention (shutting down, starting up)."""


def probe(url: str) -> None:
    """Open one connection to ``url`` and close it; :class:`DatabaseUnavailable` if it cannot be opened.

    ``transient`` when waiting may cure it: as :func:`unavailable` says, except that a PostgreSQL server
    that answered with a refusal waiting cannot cure (a wrong password, a missing database) is not.
    """
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with unavailable(engine.dialect):
            try:
                engine.connect().close()
            except sa.exc.DBAPIError as exc:
                state = getattr(exc.orig, "sqlstate", None)
                if engine.dialect.name == "postgresql" and state and not state.startswith(_WAITABLE):
                    raise DatabaseUnavailable(_one_line(str(exc.orig)), transient=False) from exc
                raise
    finally:
        engine.dispose()


def _key(consumer: str) -> int:
    digest = hashlib.sha1(f"lifecycle-consumer:{consumer}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def advisory_lock(conn: sa.Connection, consumer: str) -> None:
    """Take ``consumer``'s lock for ``conn``'s session (autocommit), or raise :class:`ConsumerInUse`.

    The lock lasts as long as the session: closing the connection releases it.
    """
    if not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _key(consumer)}).scalar_one():
        raise ConsumerInUse(consumer, _pg_holder(conn, consumer))


_HOLDER = sa.text(
    "SELECT a.pid, a.client_addr, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :high AND l.objid = :low AND l.objsubid = 1"
)


def _lock_ids(consumer: str) -> dict[str, int]:
    unsigned = _key(consumer) & 0xFFFF_FFFF_FFFF_FFFF  # a bigint key shows in pg_locks as two oids
    return {"high": unsigned >> 32, "low": unsigned & 0xFFFF_FFFF}


def _pg_holder(conn: sa.Connection, consumer: str) -> str | None:
    """Say which PostgreSQL session holds ``consumer``'s lock (None if it cannot be seen: another role's, gone)."""
    row = conn.execute(_HOLDER, _lock_ids(consumer)).first()
    if row is None or row.pid is None:
        return None
    where = f" from {row.client_addr}" if row.client_addr else ""
    app = f" ({row.application_name})" if row.application_name else ""
    return f"PostgreSQL session pid {row.pid}{where}{app} follows it"


_HELD = sa.text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()"
    " AND classid = :high AND objid = :low AND objsubid = 1)"
)


def holds_advisory_lock(conn: sa.Connection, consumer: str) -> bool:
    """Return whether ``conn``'s session holds ``consumer``'s lock; the database's error if the session is gone."""
    return bool(conn.execute(_HELD, _lock_ids(consumer)).scalar_one())


@contextmanager
def file_lock(database: str | None, consumer: str) -> Iterator[None]:
    """Hold ``consumer``'s lock file next to the SQLite ``database`` for the block, or raise :class:`ConsumerInUse`."""
    name = hashlib.sha1(consumer.encode()).hexdigest()[:16]
    beside = database if database and database != ":memory:" else f"{tempfile.gettempdir()}/lifecycle-memory"
    path = f"{beside}.consumer-{name}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip()
            raise ConsumerInUse(consumer, f"{holder} follows it" if holder else None) from None
        handle.truncate(0)  # who holds it, for the message of a follower refused meanwhile
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            with suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
