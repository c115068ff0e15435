"""Compare-and-swap writes: losing is a typed error and changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import sqlalchemy as sa

from lifecycle import Conflict, Engine, Flavor, PowerState, TaskState, upgrade
from lifecycle.audit import Why
from lifecycle.records import Cause
from lifecycle.store import db
from tests.conftest import wait_until
from tests.images import fake_image


def test_stale_version_raises_conflict_with_expected_and_actual(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """A write from a stale read loses: Conflict names what it expected and what it found."""
    uuid = new_instance()
    stale = engine.get(uuid)
    engine.stop(uuid)
    history = engine.history(uuid)
    with pytest.raises(Conflict) as info:
        engine.store.writes.mark_error(stale, PowerState.PAUSED, Why(actor="test", cause=Cause.SYNC))
    assert info.value.expected["vm_state"] == "active"
    assert info.value.actual is not None and info.value.actual["vm_state"] == "stopped"
    assert "vm_state stopped (expected active)" in str(info.value)
    assert engine.history(uuid) == history
    assert engine.get(uuid).power_state is PowerState.SHUTDOWN


def test_cas_checks_the_task_id_not_only_the_states(engine: Engine, new_instance: Callable[..., str]) -> None:
    """Same states but another version (another writer) is still a conflict."""
    uuid = new_instance()
    current = engine.get(uuid)
    with pytest.raises(Conflict):
        engine.store.writes.mark_error(
            replace(current, version=current.version - 1), PowerState.PAUSED, Why(actor="t", cause=Cause.SYNC)
        )


def test_power_write_has_exactly_one_audit_row(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A sync-style power write records one audit row with its rule, cause and actor."""
    uuid = new_instance()
    before = len(engine.history(uuid))
    why = Why(actor="sync", cause=Cause.SYNC, rule="copy_power")
    engine.store.sync.set_power_many([(engine.get(uuid), PowerState.CRASHED, why)])
    rows = engine.history(uuid)
    assert len(rows) == before + 1
    assert (rows[-1].cause, rows[-1].rule, rows[-1].from_power_state, rows[-1].to_power_state) == (
        "sync",
        "copy_power",
        1,
        6,
    )


def test_one_running_task_per_instance_is_enforced_by_the_database(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """Two task rows running on one instance violate a unique index, surfacing as Conflict."""
    uuid = new_instance()
    instance = engine.get(uuid)
    t1 = engine.runner.new_task(uuid, "stop", params={}, request_id=None, key=None, actor="a", cause=Cause.API)
    engine.store.writes.begin(instance, t1, TaskState.POWERING_OFF, Why("a", Cause.API), None)
    t2 = engine.runner.new_task(uuid, "pause", params={}, request_id=None, key=None, actor="b", cause=Cause.API)
    with pytest.raises(Conflict):
        engine.store.writes.begin(engine.get(uuid), t2, TaskState.PAUSING, Why("b", Cause.API), None)
    engine.force_delete(uuid)


@pytest.fixture
def pg_vm(pg_url: str) -> Iterator[tuple[Engine, str]]:
    """An engine on a migrated PostgreSQL database with host h1, image cirros and one instance built there."""
    upgrade(pg_url)
    with Engine(pg_url) as engine:
        engine.hosts.add("h1", "fake://")
        engine.images.add("cirros", fake_image())
        yield engine, engine.create("vm", host="h1", flavor=Flavor(1, 64, 1, name="tiny"), image="cirros").instance_uuid


def _terminate_backends(url: str) -> int:
    """End every other server connection to the database of ``url`` (a restart, as the pool sees it); wait until gone."""
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    try:
        with admin.connect() as conn:
            ended = len(conn.exec_driver_sql(f"SELECT pg_terminate_backend(pid) {others}").all())
            # A backend sends its goodbye to the client before it exits: once none is left, every socket has it.
            left = f"SELECT count(*) {others}"
            wait_until("the ended backends gone", lambda: not conn.exec_driver_sql(left).scalar_one(), interval=0.01)
            return ended
    finally:
        admin.dispose()


@pytest.mark.postgres
def test_a_pooled_connection_idle_past_the_ping_time_is_checked_and_replaced(
    pg_vm: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections the server dropped while idle are pinged at checkout and replaced: the next operation works."""
    engine, _uuid = pg_vm
    monkeypatch.setattr(db, "PING_IDLE_SECONDS", 0.0)  # every pooled connection counts as idle
    monkeypatch.setattr(db, "_readable", lambda _conn: False)  # only the idle time decides
    assert _terminate_backends(engine.store.url) >= 1
    assert [h.name for h in engine.store.hosts.list()] == ["h1"]
    engine.hosts.add("h2", "fake://")


@pytest.mark.postgres
def test_a_pooled_connection_idle_past_the_ping_time_and_alive_serves_reads_and_writes(
    pg_vm: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A successful ping leaves no transaction open: the reads (autocommit) and writes after it work."""
    engine, uuid = pg_vm
    monkeypatch.setattr(db, "PING_IDLE_SECONDS", 0.0)  # every checkout pings
    for name in ("h2", "h3"):
        assert engine.store.hosts.list()[-1].name < name
        engine.hosts.add(name, "fake://")
    assert engine.stop(uuid).outcome.value == "succeeded" and engine.get(uuid).vm_state.value == "stopped"


@pytest.mark.postgres
def test_a_connection_the_server_ended_a_moment_after_its_use_is_replaced_without_a_failure(
    pg_vm: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within the ping time, a connection whose socket holds the server's goodbye is pinged and replaced: no error."""
    engine, _uuid = pg_vm
    monkeypatch.setattr(db, "PING_IDLE_SECONDS", 3600.0)
    assert _terminate_backends(engine.store.url) >= 1
    assert [h.name for h in engine.store.hosts.list()] == ["h1"]
    engine.hosts.add("h2", "fake://")


@pytest.mark.postgres
def test_a_write_whose_connection_died_under_a_statement_is_run_again_once(
    pg_vm: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that lost its connection before COMMIT (nothing committed) is retried on a fresh one and succeeds."""
    engine, uuid = pg_vm
    monkeypatch.setattr(db, "PING_IDLE_SECONDS", 3600.0)
    monkeypatch.setattr(db, "_readable", lambda _conn: False)  # no check at checkout: the statement finds it dead
    assert _terminate_backends(engine.store.url) >= 1
    with pytest.raises(sa.exc.OperationalError):
        engine.get(uuid)  # a read is not retried: it fails once with the database's own error
    before = engine.get(uuid)  # the pool's dead connections are gone: this one is fresh
    assert _terminate_backends(engine.store.url) >= 1
    (after,) = engine.store.sync.set_power_many([(before, PowerState.SHUTDOWN, Why(actor="test", cause=Cause.SYNC))])
    assert engine.get(uuid) == after and after.power_state is PowerState.SHUTDOWN
    assert [e.to_power_state for e in engine.history(uuid)][-2:] == [PowerState.RUNNING, PowerState.SHUTDOWN]


@pytest.mark.postgres
def test_on_postgresql_each_state_write_of_a_task_is_one_statement(pg_vm: tuple[Engine, str]) -> None:
    """A stop on PostgreSQL sends three statements: the read, then its start and its end, each one round trip."""
    engine, uuid = pg_vm
    sent: list[str] = []
    sa.event.listen(engine.store.engine, "before_cursor_execute", lambda *a: sent.append(a[2].split()[0]))
    engine.stop(uuid)
    assert sent == ["SELECT", "WITH", "WITH"]
    assert [(e.to_vm_state, e.to_task_state) for e in engine.history(uuid)][-2:] == [
        ("active", "powering-off"),
        ("stopped", None),
    ]
    assert [s.result for s in engine.store.tasks.steps(engine.store.tasks.of(uuid)[-1].id)] == ["ok"]


@pytest.mark.postgres
def test_a_one_statement_write_refuses_a_value_too_long_instead_of_cutting_it(pg_vm: tuple[Engine, str]) -> None:
    """Casts in the one-statement writes carry no length: a value over a column's length fails, nothing is written."""
    engine, uuid = pg_vm
    before, history = engine.get(uuid), engine.history(uuid)
    task = engine.runner.new_task(uuid, "stop", params={}, request_id="r" * 65, key=None, actor="test", cause=Cause.API)
    with pytest.raises(sa.exc.DataError, match="too long"):
        engine.store.writes.begin(before, task, TaskState.POWERING_OFF, Why(actor="test", cause=Cause.API), None)
    assert engine.get(uuid) == before and engine.history(uuid) == history
