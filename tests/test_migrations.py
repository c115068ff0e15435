"""Schema only through alembic: round trips, and no drift between models and migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from lifecycle import Engine, SchemaOutOfDate
from lifecycle.store import downgrade, head_revision, upgrade
from lifecycle.store.db import connect, current_revision
from lifecycle.store.tables import metadata


def _tables(url: str) -> set[str]:
    engine = connect(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _drift(url: str) -> list[object]:
    engine = connect(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    upgrade(url)
    assert _tables(url) == set(metadata.tables)
    engine = connect(url)
    assert current_revision(engine) == head_revision()
    engine.dispose()
    assert _drift(url) == [], "models and migrations disagree: write a migration"
    downgrade(url, "base")
    assert _tables(url) == set()
    upgrade(url)
    assert _drift(url) == []


def test_round_trip_and_no_drift_on_sqlite(tmp_path: Path) -> None:
    """Upgrade head, downgrade base, upgrade again on SQLite; autogenerate finds nothing to do."""
    _round_trip(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
def test_round_trip_and_no_drift_on_postgres(pg_url: str) -> None:
    """The same round trip and empty diff on PostgreSQL."""
    _round_trip(pg_url)


def test_engine_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    """An engine on a database not at head says to run `lifecycle db upgrade`."""
    with pytest.raises(SchemaOutOfDate, match="lifecycle db upgrade"):
        Engine(f"sqlite:///{tmp_path / 'empty.db'}")
