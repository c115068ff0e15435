"""Alembic environment: target_metadata is the metadata of lifecycle's SQLAlchemy Core tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context
from alembic.util import CommandError

from lifecycle.store.db import connect
from lifecycle.store.tables import metadata

config = context.config


def run_migrations_offline() -> None:
    """Emit SQL for the configured URL without connecting."""
    url = config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations over a connection (batch mode so SQLite can alter tables)."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = connect(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection: sa.Connection) -> None:
    with _sqlite_foreign_keys_off(connection):
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
            _check_foreign_keys(connection)


@contextmanager
def _sqlite_foreign_keys_off(connection: sa.Connection) -> Iterator[None]:
    """Turn SQLite's foreign key enforcement off while the migrations run, and back on after.

    Batch mode alters a SQLite table by copying it and dropping the original;
    with enforcement on, that drop deletes the rows other tables reference
    and fails ("FOREIGN KEY constraint failed") as soon as there is data.
    Alembic's batch documentation prescribes this. The pragma is a no-op
    inside a transaction, so it is issued on the DBAPI connection before the
    migrations begin theirs (the connection runs in autocommit mode, see
    ``lifecycle.store.db``); :func:`_check_foreign_keys` then verifies that
    the migrations left every reference intact.
    """
    if connection.dialect.name != "sqlite":
        yield
        return
    dbapi = connection.connection.driver_connection
    assert dbapi is not None
    dbapi.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        dbapi.execute("PRAGMA foreign_keys=ON")


def _check_foreign_keys(connection: sa.Connection) -> None:
    """Fail the migrations (rolling them back) if they left a row pointing at nothing (SQLite)."""
    if connection.dialect.name != "sqlite":
        return
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        rows = ", ".join(f"{table} row {rowid} -> {parent}" for table, rowid, parent, _fk in broken[:5])
        raise CommandError(f"the migration left {len(broken)} broken foreign key reference(s): {rows}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
