"""Schema only through alembic: round trips, and no drift between the tables (the store's and lifecycle.models') and migrations."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from lifecycle import Engine, Flavor, InvalidInput, SchemaOutOfDate, models
from lifecycle.store import downgrade, head_revision, upgrade
from lifecycle.store.db import connect, current_revision, known_revisions
from lifecycle.store.tables import metadata
from tests.conftest import FLAVOR, Fakes
from tests.images import fake_image


def _tables(url: str) -> set[str]:
    engine = connect(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _models_metadata() -> sa.MetaData:
    """Return the tables lifecycle.models' classes map, copied into a metadata of their own."""
    mapped = sa.MetaData()
    for model in (
        models.Host,
        models.Claim,
        models.Image,
        models.Instance,
        models.Task,
        models.TaskStep,
        models.AuditEntry,
        models.Migration,
    ):
        table = sa.inspect(model).local_table
        assert isinstance(table, sa.Table)
        table.to_metadata(mapped)
    return mapped


def _drift(url: str) -> list[object]:
    """Return what autogenerate would change: for the store's tables, and for the tables lifecycle.models maps."""
    mapped = _models_metadata()
    only_mapped = {"include_name": lambda name, kind, parent: kind != "table" or name in mapped.tables}
    engine = connect(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            store = list(compare_metadata(ctx, metadata))
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, **only_mapped})
            return [*store, *compare_metadata(ctx, mapped)]
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


def _counts(url: str) -> dict[str, int]:
    """Rows per table, for every table the database has now (alembic's own excluded)."""
    engine = connect(url)
    try:
        with engine.connect() as conn:
            return {
                table: conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one() for table in _tables(url)
            }
    finally:
        engine.dispose()


_STOPPED = threading.Event()
_STOPPED.set()


def _populate(url: str) -> dict[str, int]:
    """Write rows into every table through the engine: hosts, an image, a moved instance, its tasks, audit, claims."""
    fakes = Fakes()
    with Engine(url, driver_factory=fakes.factory) as engine:
        for name in ("h1", "h2"):
            engine.hosts.add(name, "fake://", vcpus=8, memory_mb=4096, disk_gb=40)
            engine.hosts.heartbeat(name)
        engine.images.add("cirros", fake_image("cirros"))
        uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros", uuid=None).instance_uuid
        engine.migrate(uuid, host="h2")  # a migration row, claims on both hosts
        engine.consoles.get_vnc_console(uuid)
        engine.create("other", host="h1", flavor=FLAVOR, image="cirros")
        engine.feed.follow("billing", lambda change: None, stop=_STOPPED)  # a feed consumer's position
    counts = _counts(url)
    assert all(counts.values()), f"a table has no row, the round trip would not test it: {counts}"
    return counts


def _round_trip_with_data(url: str) -> None:
    downgrade(url, "base")
    upgrade(url)
    alive = _populate(url)
    for revision in [*reversed(known_revisions()[:-1]), "base"]:
        downgrade(url, revision)
        present = _counts(url)
        alive = {t: n for t, n in alive.items() if t in present}  # a dropped table's rows are gone for good
        assert present == alive, f"rows lost or invented going down to {revision}"
        upgrade(url)
        assert {t: n for t, n in _counts(url).items() if t in alive} == alive, f"rows lost coming back from {revision}"
        assert _drift(url) == [], f"models and migrations disagree after a round trip through {revision}"


def test_every_revision_goes_down_and_back_up_with_data(db_url: str) -> None:
    """From head holding a row in every table, each downgrade (one revision further each time) and the upgrade back keep every surviving row, on SQLite (foreign keys enforced) and PostgreSQL, with no drift."""
    _round_trip_with_data(db_url)


def test_instances_stored_before_0016_read_back_without_extra_specs(db_url: str) -> None:
    """Down to 0015 the instances' extra specs go with their column; back at head the instance reads back with none."""
    specced = Flavor(1, 64, 1, name="ssd", extra_specs=(("capabilities:ssd", "true"),))
    fakes = Fakes()
    with Engine(db_url, driver_factory=fakes.factory) as engine:
        engine.hosts.add("h1", "fake://", capabilities={"ssd": "true"})
        engine.hosts.heartbeat("h1")
        engine.images.add("cirros", fake_image("cirros"))
        uuid = engine.create("vm", flavor=specced, image="cirros").instance_uuid
        assert engine.get(uuid).flavor == specced
    downgrade(db_url, "0015")
    upgrade(db_url)
    with Engine(db_url, driver_factory=fakes.factory) as engine:
        assert engine.get(uuid).flavor == Flavor(1, 64, 1, name="ssd")


def test_sqlite_enforces_foreign_keys_again_after_migrations(tmp_path: Path) -> None:
    """Migrations switch SQLite foreign keys off only while they run: the engine's connections still enforce them."""
    url = f"sqlite:///{tmp_path / 'fk.db'}"
    upgrade(url)
    downgrade(url, known_revisions()[-2])
    upgrade(url)
    engine = connect(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
            with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"):
                conn.exec_driver_sql(
                    "INSERT INTO claims (instance_uuid, host, vcpus, memory_mb, disk_gb, created_at)"
                    " VALUES ('nope', 'nope', 1, 1, 1, '2026-01-01')"
                )
    finally:
        engine.dispose()


def _corrupt(tmp_path: Path) -> str:
    path = tmp_path / "corrupt.db"
    path.write_bytes(bytes(range(256)) * 64)
    return f"sqlite:///{path}"


@pytest.mark.parametrize(
    ("make_url", "needle"),
    [
        (lambda tmp: "", "invalid database URL '': empty"),
        (lambda tmp: "   ", "invalid database URL '   ': empty"),
        (lambda tmp: "not a url", "invalid database URL 'not a url': Could not parse"),
        (lambda tmp: "foo://x", "invalid database URL foo://x: unknown database kind"),
        (lambda tmp: "mysql://u@h/x", "needs the Python module MySQLdb, which is not installed"),
        (
            lambda tmp: "sqlite:////no/such/dir/x.db",
            "cannot open the database sqlite:////no/such/dir/x.db: unable to open database file"
            " (folder /no/such/dir does not exist)",
        ),
        (_corrupt, "file is not a database"),
        (lambda tmp: "postgresql+psycopg://u:secret@127.0.0.1:1/x", "postgresql+psycopg://u:***@127.0.0.1:1/x"),
    ],
)
def test_an_unusable_database_is_a_typed_error(tmp_path: Path, make_url: Any, needle: str) -> None:
    """Engine, upgrade and downgrade refuse a bad URL, a missing driver or folder, a corrupt file or a dead server with one InvalidInput line keeping the database's message, password hidden."""
    url = make_url(tmp_path)
    for attempt in (lambda: Engine(url), lambda: upgrade(url), lambda: downgrade(url, "base")):
        with pytest.raises(InvalidInput) as info:
            attempt()
        message = str(info.value)
        assert needle in message and "\n" not in message and "secret" not in message


def _stamp(url: str, revision: str) -> None:
    engine = connect(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("action", "needle"),
    [
        (
            lambda url: upgrade(url, "zzz"),
            "cannot upgrade to revision 'zzz': Can't locate revision identified by 'zzz'",
        ),
        (lambda url: downgrade(url, "0099"), "cannot downgrade to revision '0099': Can't locate revision"),
        (lambda url: downgrade(url, "+1"), "cannot downgrade to revision '+1'"),
        (lambda url: downgrade(url, ""), "cannot downgrade to revision '': not a revision"),
        (lambda url: downgrade(url, "head@x"), "cannot downgrade to revision 'head@x': not a revision"),
        (lambda url: upgrade(url, "0001:0002"), "cannot upgrade to revision '0001:0002': not a revision"),
        (lambda url: upgrade(url, "0001"), "cannot upgrade to revision '0001', older than the database: use downgrade"),
    ],
)
def test_an_unknown_or_wrong_way_revision_is_refused(sqlite_url: str, action: Any, needle: str) -> None:
    """Unknown, relative-past-the-end and backwards targets are refused with the known revisions listed, schema untouched."""
    with pytest.raises(InvalidInput) as info:
        action(sqlite_url)
    assert needle in str(info.value) and f"known revisions: base, {', '.join(known_revisions())}" in str(info.value)
    engine = connect(sqlite_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_a_database_from_a_newer_version_is_refused(sqlite_url: str) -> None:
    """A database at a revision this version does not know is neither upgraded nor downgraded, and the engine will not open it."""
    _stamp(sqlite_url, "9999")
    for action in (upgrade, downgrade):
        with pytest.raises(InvalidInput, match="at revision '9999', which this version of lifecycle does not know"):
            action(sqlite_url)
    with pytest.raises(SchemaOutOfDate):
        Engine(sqlite_url)


def test_the_head_read_without_alembic_is_alembics_head() -> None:
    """head_revision() (read from the migration files, for a fast start) names the head alembic computes."""
    from lifecycle.store.db import _scripts

    assert head_revision() == _scripts().get_current_head()
