"""Connections, stored times and the alembic schema helpers.

SQLite is the embedded default (a file, WAL, foreign keys on, a busy timeout
so concurrent writers queue instead of failing). PostgreSQL is used as is.

A database that cannot be used (a malformed URL, an unknown scheme, a driver
that is not installed, a server that does not answer, a file that is not a
database, a revision this version does not know) raises :class:`InvalidInput`
from :func:`connect`, :func:`check_schema`, :func:`upgrade` or
:func:`downgrade`, with the database's own message on one line and the URL
shown without its password.
"""

from __future__ import annotations

import functools
import re
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from lifecycle import validation
from lifecycle.errors import InvalidInput, SchemaOutOfDate

__all__ = [
    "DEFAULT_DB_URL",
    "aware",
    "check_schema",
    "connect",
    "current_revision",
    "downgrade",
    "head_revision",
    "known_revisions",
    "upgrade",
]

DEFAULT_DB_URL = "sqlite:///lifecycle.db"

_REVISION = re.compile(r"(?=.)(base|heads?|[0-9A-Za-z_]+)?([+-][0-9]{1,4})?", re.ASCII)
"""What ``db upgrade``/``downgrade`` take: a revision id, head or base, optionally +N or -N steps."""


def aware(value: datetime | None) -> datetime | None:
    """Return ``value`` as aware UTC (SQLite hands back naive datetimes)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def connect(url: str) -> sa.Engine:
    """Create an SQLAlchemy engine for ``url`` with the pragmas the engine relies on.

    Nothing connects yet; a URL that cannot name a usable database raises
    :class:`InvalidInput` (the first connection's failures surface in
    :func:`check_schema`, :func:`upgrade` and :func:`downgrade`).
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"invalid database URL {url!r}: empty (e.g. sqlite:///lifecycle.db)")
    try:
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            sa.event.listen(engine, "begin", _sqlite_begin_immediate)
            return engine
        engine = sa.create_engine(url)
        sa.event.listen(engine.pool, "checkin", _mark_used)
        sa.event.listen(engine.pool, "connect", _mark_used)
        sa.event.listen(engine.pool, "checkout", _ping_when_in_doubt(engine))
        return engine
    except sa.exc.NoSuchModuleError as exc:
        raise InvalidInput(f"invalid database URL {shown_url(url)}: unknown database kind ({exc})") from None
    except sa.exc.ArgumentError as exc:
        raise InvalidInput(f"invalid database URL {shown_url(url)}: {_one_line(str(exc))}") from None
    except ImportError as exc:
        # The dialect is known but its DBAPI module (MySQLdb, psycopg2, ...) is not installed.
        raise InvalidInput(
            f"database URL {shown_url(url)} needs the Python module {exc.name or exc}, which is not installed"
        ) from None


PING_IDLE_SECONDS = 1.0
"""A pooled server connection idle this long is pinged before it is handed out (see :func:`_ping_when_in_doubt`)."""


def _mark_used(_dbapi_conn: Any, record: Any) -> None:
    record.info["lifecycle_used"] = time.monotonic()


def _ping_when_in_doubt(engine: sa.Engine) -> Any:
    """Return the pool checkout hook: ping a pooled connection only when it may be dead; a dead one is replaced.

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout: under load, one
    round trip per transaction and per read that buys nothing, since a
    connection used a moment ago is alive (``bench/storm.py`` measured 7 pings
    per operation, a fifth of its round trips). Here a connection is pinged
    when it sat idle for :data:`PING_IDLE_SECONDS` or more (the server may
    have restarted, or a firewall dropped it), or when its socket has
    something to read although no query is in flight: a server that ends a
    connection (a restart, ``pg_terminate_backend``) sends its reason and
    closes, which a zero-timeout ``select`` sees without a round trip. A ping
    that fails raises ``DisconnectionError``, which makes the pool open a
    fresh connection. The ping is the dialect's own (it leaves no transaction open).
    """

    def hook(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        used = record.info.get("lifecycle_used")
        if used is not None and time.monotonic() - used < PING_IDLE_SECONDS and not _readable(dbapi_conn):
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the driver's own error class: any failure means the connection is unusable
            raise sa.exc.DisconnectionError(f"pooled connection failed its ping: {exc}") from exc
        if not alive:
            raise sa.exc.DisconnectionError("pooled connection failed its ping")
        record.info["lifecycle_used"] = time.monotonic()

    return hook


def _readable(dbapi_conn: Any) -> bool:
    """Whether an idle connection's socket has data or an end of file waiting (True also when it cannot be told)."""
    try:
        ready, _, _ = select.select([dbapi_conn.fileno()], [], [], 0)
    except (AttributeError, OSError, ValueError):  # no socket to look at (closed, or a driver without fileno)
        return True
    return bool(ready)


def shown_url(url: str | sa.URL) -> str:
    """Return the URL as it may be printed: the password hidden (in the query too), quoted when it does not parse."""
    try:
        return validation.masked_query(sa.make_url(url).render_as_string(hide_password=True))
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port or an IPv6 host that does not parse
        return validation.shown_url(str(url))  # already quoted


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


@contextmanager
def _database_errors(url: str | sa.URL, action: str) -> Iterator[None]:
    """Raise :class:`InvalidInput` for a database the driver cannot open, reach or read."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        reason = _one_line(str(exc.orig)) or type(exc.orig).__name__
        raise InvalidInput(f"cannot {action} the database {shown_url(url)}: {reason}{_missing_folder(url)}") from None


def _missing_folder(url: str | sa.URL) -> str:
    """Say which folder is missing when a SQLite file cannot be opened because of it."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return ""
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return ""
    folder = Path(parsed.database).absolute().parent
    return "" if folder.is_dir() else f" (folder {folder} does not exist)"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling would defer BEGIN; we issue it ourselves.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _sqlite_begin_immediate(conn: sa.Connection) -> None:
    # Writers take the write lock at BEGIN so two of them queue on busy_timeout
    # instead of one failing with "database is locked" when it upgrades a read
    # lock. Readers (execution option readonly) take none: WAL lets them run.
    if conn.get_execution_options().get("readonly"):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _config(url: str) -> Any:
    from alembic.config import Config  # alembic only for db commands: every other command starts faster

    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _migrations_dir() -> Path:
    """Return the alembic scripts shipped inside the package (``lifecycle/migrations``), never an application's own."""
    return Path(str(resources.files("lifecycle") / "migrations"))


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` with alembic.

    An unknown revision, or a database at a revision this version does not
    know (a newer lifecycle wrote it), raises :class:`InvalidInput` before
    anything changes.
    """
    _migrate(url, "upgrade", revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision`` with alembic (see :func:`upgrade`)."""
    _migrate(url, "downgrade", revision)


def _migrate(url: str, verb: str, revision: str) -> None:
    engine = connect(url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    known = known_revisions()
    if current is not None and current not in known:
        raise InvalidInput(
            f"the database {shown_url(url)} is at revision {current!r}, which this version of lifecycle does not know"
            f" (it knows {', '.join(known)}): a newer lifecycle wrote it; use that version"
        )
    order = ["base", *known]
    where = f"(the database is at {current or 'base'}; known revisions: {', '.join(order)})"
    if not isinstance(revision, str) or not _REVISION.fullmatch(revision):
        # alembic reads '@' and ':' as branch and range syntax, and asserts on an empty string
        raise InvalidInput(f"cannot {verb} to revision {revision!r}: not a revision, head, base or +N/-N {where}")
    if verb == "upgrade" and revision in order and order.index(revision) < order.index(current or "base"):
        # alembic would silently do nothing
        raise InvalidInput(f"cannot upgrade to revision {revision!r}, older than the database: use downgrade {where}")
    from alembic import command
    from alembic.util import CommandError

    run = command.upgrade if verb == "upgrade" else command.downgrade
    with _database_errors(url, verb):
        try:
            run(_config(url), revision)
        except CommandError as exc:
            raise InvalidInput(f"cannot {verb} to revision {revision!r}: {_one_line(str(exc))} {where}") from None


def _scripts() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config("sqlite://"))


def known_revisions() -> list[str]:
    """Return the revisions shipped with this version, oldest first (``base`` not included)."""
    return [script.revision for script in reversed(list(_scripts().walk_revisions("base", "heads")))]


_REVISION_LINE = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*['\"]?([A-Za-z0-9_]+|None)['\"]?", re.M)


@functools.cache
def head_revision() -> str:
    """Return the head revision of the migrations shipped with this version.

    Read from the migration files' ``revision`` and ``down_revision`` lines
    (the one no other revision follows), without importing alembic; a test
    checks it against alembic's own answer.
    """
    revisions: set[str] = set()
    parents: set[str | None] = set()
    for path in (_migrations_dir() / "versions").glob("*.py"):
        found: dict[str, str] = dict(_REVISION_LINE.findall(path.read_text()))
        if "revision" in found:
            revisions.add(found["revision"])
            parents.add(found.get("down_revision"))
    heads = sorted(r for r in revisions if r not in parents)
    assert len(heads) == 1, f"the migrations must have one head, found {heads}"
    return heads[0]


def current_revision(engine: sa.Engine) -> str | None:
    """Return the revision the database is at, or None for an empty database (alembic's version table)."""
    with _database_errors(engine.url, "open"), engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def check_schema(engine: sa.Engine) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutOfDate(current, head)
