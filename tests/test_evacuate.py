"""Host fencing and evacuate on fake hosts: guards, the rebuild elsewhere, records, claims, the returning host."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lifecycle import Engine, Flavor, HostNotEvacuable, InvalidInput, PowerState, TaskFailed, TaskState, VmState
from lifecycle.cli import main
from lifecycle.daemon import HostWorker
from lifecycle.evacuation import DATA_LOSS, EvacuationOutcome
from lifecycle.states import MigrationStatus
from tests.conftest import Fakes, make_engine
from tests.invariants import check_invariants
from tests.test_cli_bad_input import World, _argv, _assert_typed_error, dump, template, world

__all__ = ["template", "world"]  # the bad-input fixtures, shared with tests/test_cli_bad_input.py

V = VmState
SMALL = Flavor(1, 512, 1)


@pytest.fixture
def cloud(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """Three fake hosts with room (h1, h2, h3), all up, image cirros."""
    engine = make_engine(db_url, fakes, shutdown_timeout=0.0)
    engine.hosts.add("h3", "fake://")
    for host in ("h1", "h2", "h3"):
        engine.store.hosts.update(host, vcpus=8, memory_mb=8192, disk_gb=80)
        engine.hosts.heartbeat(host)
    yield engine
    check_invariants(engine.store)
    engine.close()


def _down(engine: Engine, host: str) -> None:
    engine.store.hosts.update(
        host, last_heartbeat=datetime.now(UTC) - timedelta(seconds=engine.settings.host_down_after + 5)
    )


def _dead(engine: Engine, host: str) -> None:
    _down(engine, host)
    engine.hosts.fence(host, reason="power supply failed", actor="ops")


def _on(engine: Engine, host: str, **kw: Any) -> str:
    return engine.create("vm", host=host, flavor=SMALL, image="cirros", **kw).instance_uuid


def test_fence_records_who_why_and_when_and_unfence_clears_it(cloud: Engine) -> None:
    """A fence is recorded with actor, reason and time; fencing twice is refused; unfence clears all three."""
    h = cloud.hosts.fence("h1", reason="  disk controller dead ", actor="ops")
    assert (h.fenced, h.fenced_by, h.fenced_reason) == (True, "ops", "disk controller dead")
    assert h.fenced_at is not None and abs((datetime.now(UTC) - h.fenced_at).total_seconds()) < 60
    with pytest.raises(InvalidInput, match="already fenced"):
        cloud.hosts.fence("h1", reason="again", actor="ops")
    with pytest.raises(InvalidInput, match="reason"):
        cloud.hosts.fence("h2", reason=" ", actor="ops")
    h = cloud.hosts.unfence("h1", actor="ops")
    assert (h.fenced, h.fenced_at, h.fenced_by, h.fenced_reason) == (False, None, None, None)


def test_a_fenced_host_is_never_scheduled_even_when_up(cloud: Engine) -> None:
    """The scheduler refuses a fenced host whatever its heartbeat and whichever filters are on, named or not."""
    cloud.hosts.fence("h1", reason="suspect", actor="ops")
    cloud.hosts.set_enabled("h3", False)
    for _ in range(5):
        assert cloud.get(_on(cloud, None)).host == "h2"  # type: ignore[arg-type]
    with pytest.raises(TaskFailed, match=r"NoValidHost.*fenced"):
        _on(cloud, "h1")
    uuid = _on(cloud, "h2")
    with pytest.raises(TaskFailed, match=r"NoValidHost.*fenced"):
        cloud.migrate(uuid, host="h1")
    assert cloud.get(uuid).host == "h2"


@pytest.mark.parametrize(
    ("down", "fenced", "failing"),
    [(False, False, ["down", "fenced"]), (True, False, ["fenced"]), (False, True, ["down"])],
)
def test_evacuate_needs_the_host_down_and_fenced(
    cloud: Engine, fakes: Fakes, down: bool, fenced: bool, failing: list[str]
) -> None:
    """Each failing condition is named by HostNotEvacuable, for one instance and a host, and nothing changes."""
    uuid = _on(cloud, "h1")
    if down:
        _down(cloud, "h1")
    if fenced:
        cloud.hosts.fence("h1", reason="r", actor="ops")
    before = cloud.get(uuid)
    with pytest.raises(HostNotEvacuable) as one:
        cloud.evacuate(uuid)
    assert one.value.failing == failing and one.value.uuid == uuid
    for word in failing:
        assert f"not {word}" in str(one.value)
    with pytest.raises(HostNotEvacuable) as host:
        cloud.hosts.evacuate("h1")
    assert host.value.failing == failing
    assert cloud.get(uuid) == before and [t.operation for t in cloud.tasks(uuid)] == ["create"]
    assert "h2" not in fakes or not fakes["h2"].domain_exists(uuid)


def test_evacuate_refuses_a_deleted_or_busy_instance_and_a_bad_destination(cloud: Engine) -> None:
    """The table's guard still applies (paused is not evacuable), and the destination must be another known host."""
    uuid = _on(cloud, "h1")
    idle = _on(cloud, "h1")
    cloud.pause(uuid)
    _dead(cloud, "h1")
    with pytest.raises(Exception, match="cannot evacuate"):
        cloud.evacuate(uuid)
    other = _on(cloud, "h2")
    with pytest.raises(InvalidInput, match="the host it is on"):
        cloud.evacuate(idle, host="h1")
    with pytest.raises(InvalidInput):
        cloud.evacuate(other, host="nowhere")


@pytest.mark.parametrize("stopped", [False, True], ids=["active", "stopped"])
def test_evacuate_rebuilds_elsewhere_keeping_identity(cloud: Engine, fakes: Fakes, stopped: bool) -> None:
    """The instance is rebuilt on another host: same uuid, name, flavor, image; active, or stopped if it was."""
    uuid = _on(cloud, "h1")
    if stopped:
        cloud.stop(uuid)
    before = cloud.get(uuid)
    _dead(cloud, "h1")
    task = cloud.evacuate(uuid, host="h3")
    after = cloud.get(uuid)
    assert task.operation == "evacuate"
    assert (after.uuid, after.name, after.flavor, after.image) == (
        before.uuid,
        before.name,
        before.flavor,
        before.image,
    )
    assert after.host == "h3" and after.task_state is None
    assert after.vm_state is (V.STOPPED if stopped else V.ACTIVE)
    assert after.power_state is (PowerState.SHUTDOWN if stopped else PowerState.RUNNING)
    assert fakes["h3"].get_info(uuid) is after.power_state
    walked = [e.to_task_state for e in cloud.history(uuid) if e.task_id == task.id]
    assert walked == [TaskState.REBUILDING, TaskState.REBUILD_BLOCK_DEVICE_MAPPING, TaskState.REBUILD_SPAWNING, None]
    said = [e.message for e in cloud.history(uuid) if DATA_LOSS in (e.message or "")]
    assert len(said) == 1 and "evacuated from h1 (down and fenced) to h3" in said[0]  # the one data-loss sentence
    (migration,) = cloud.migrations()
    assert (migration.kind, migration.source_host, migration.dest_host) == ("evacuation", "h1", "h3")
    assert migration.status is MigrationStatus.DONE and migration.task_id == task.id
    assert cloud.store.claims.of(uuid) == ["h3"]
    assert cloud.hosts.get("h1").vcpus_used == 0 and cloud.hosts.get("h3").vcpus_used == 1
    assert cloud.store.moves.open_of(uuid) is None  # an evacuation is no move to confirm or revert


def test_evacuate_from_error_ends_active_and_the_scheduler_avoids_the_dead_host(cloud: Engine, fakes: Fakes) -> None:
    """An instance in error is evacuable and ends active on a host the scheduler picked (never the dead one)."""
    uuid = _on(cloud, "h1")
    cloud.store.writes.mark_error(cloud.get(uuid), PowerState.NOSTATE, _why())
    _dead(cloud, "h1")
    cloud.evacuate(uuid)
    after = cloud.get(uuid)
    assert after.vm_state is V.ACTIVE and after.host in ("h2", "h3")


def _why() -> Any:
    from lifecycle.audit import Why
    from lifecycle.records import Cause

    return Why(actor="test", cause=Cause.ADMIN, operation="setup")


def test_host_evacuate_moves_every_instance_and_reports_each(cloud: Engine, fakes: Fakes) -> None:
    """Every live instance of the dead host is rebuilt elsewhere; one that cannot be is reported, the rest go on."""
    uuids = [_on(cloud, "h1") for _ in range(3)]
    cloud.stop(uuids[1])
    cloud.pause(uuids[2])  # not evacuable: refused, reported, left alone
    deleted = _on(cloud, "h1")
    cloud.delete(deleted)
    _dead(cloud, "h1")
    results = {r.uuid: r for r in cloud.hosts.evacuate("h1")}
    assert set(results) == set(uuids)
    assert [results[u].outcome for u in uuids] == [
        EvacuationOutcome.EVACUATED,
        EvacuationOutcome.EVACUATED,
        EvacuationOutcome.REFUSED,
    ]
    assert cloud.get(uuids[0]).vm_state is V.ACTIVE and cloud.get(uuids[1]).vm_state is V.STOPPED
    for uuid in uuids[:2]:
        assert results[uuid].host == cloud.get(uuid).host != "h1"
    assert cloud.get(uuids[2]).host == "h1" and "cannot evacuate" in (results[uuids[2]].detail or "")
    assert sorted(m.instance_uuid for m in cloud.migrations() if m.kind == "evacuation") == sorted(uuids[:2])


def test_a_failed_evacuation_is_recorded_and_keeps_only_the_destination_claim(cloud: Engine, fakes: Fakes) -> None:
    """A spawn that fails on the destination ends the instance in error there, the record in error."""
    uuid = _on(cloud, "h1")
    _dead(cloud, "h1")
    cloud.hosts.driver("h2")
    fakes["h2"].faults.fail_next("spawn", OSError(5, "Input/output error"))
    with pytest.raises(Exception, match="Input/output error"):
        cloud.evacuate(uuid, host="h2")
    after = cloud.get(uuid)
    assert (after.vm_state, after.task_state, after.host) == (V.ERROR, None, "h2")
    (migration,) = cloud.migrations()
    assert migration.status is MigrationStatus.ERROR
    assert cloud.store.claims.of(uuid) == ["h2"]
    cloud.rebuild(uuid)  # it lives on h2 now, a host that is up: a rebuild there brings it back
    assert cloud.get(uuid).vm_state is V.ACTIVE


def test_no_room_anywhere_leaves_the_instance_on_its_dead_host(cloud: Engine, fakes: Fakes) -> None:
    """NoValidHost at the first step: the instance stays recorded on the dead host (in error), no claim elsewhere."""
    uuid = _on(cloud, "h1")
    _dead(cloud, "h1")
    for host in ("h2", "h3"):
        cloud.hosts.set_enabled(host, False)
    with pytest.raises(Exception, match="no valid host"):
        cloud.evacuate(uuid)
    after = cloud.get(uuid)
    assert after.host == "h1" and after.vm_state is V.ERROR and cloud.store.claims.of(uuid) == ["h1"]
    assert cloud.migrations() == []


def test_the_returning_host_destroys_its_evacuated_copies_never_starting_them(cloud: Engine, fakes: Fakes) -> None:
    """destroy_evacuated removes domain and disk of each evacuated instance, audits it, and completes the record."""
    moved, stays = _on(cloud, "h1"), _on(cloud, "h1")
    cloud.pause(stays)  # not evacuable: it still lives on h1 and must be left alone
    _dead(cloud, "h1")
    cloud.evacuate(moved, host="h2")
    fakes["h1"].power_off(moved, timeout=0, retry_interval=0)  # the dead host's copy, shut off
    summary = cloud.hosts.sync("h1")[0]
    assert summary.elsewhere == [moved] and moved not in summary.unknown_domains
    assert fakes["h1"].get_info(moved) is PowerState.SHUTDOWN, "the sync pass must never start it"
    assert not [c for c in fakes["h1"].calls if c.startswith("power_on")]
    assert cloud.hosts.destroy_evacuated("h1") == [moved]
    assert not fakes["h1"].domain_exists(moved) and fakes["h1"].domain_exists(stays)
    assert fakes["h2"].get_info(moved) is PowerState.RUNNING
    note = [e for e in cloud.history(moved) if e.operation == "destroy_evacuated"]
    assert len(note) == 1 and note[0].cause == "sync" and "on h1" in (note[0].message or "")
    assert cloud.migrations()[0].status is MigrationStatus.COMPLETED
    assert cloud.hosts.destroy_evacuated("h1") == []  # repeat-safe, nothing new to audit


def test_the_daemon_clears_evacuated_copies_before_its_first_heartbeat(cloud: Engine, fakes: Fakes) -> None:
    """A host worker destroys the evacuated copies before it heartbeats; while the hypervisor is silent it does neither."""
    uuid = _on(cloud, "h1")
    _dead(cloud, "h1")
    cloud.evacuate(uuid, host="h2")
    worker = HostWorker(cloud, "h1", image_cache_interval=3600)
    fakes["h1"].unreachable = True
    worker.heartbeat()
    assert fakes["h1"].unreachable and not worker.cleared.is_set()
    beat = cloud.hosts.get("h1").last_heartbeat
    fakes["h1"].unreachable = False
    worker.heartbeat()
    assert worker.cleared.is_set() and not fakes["h1"].domain_exists(uuid)
    assert cloud.hosts.get("h1").last_heartbeat != beat
    fakes["h1"].unreachable = True
    worker.heartbeat()
    assert not worker.cleared.is_set()  # the next answer clears again first


def test_delete_of_an_evacuated_instance_and_of_one_on_the_dead_host(cloud: Engine, fakes: Fakes) -> None:
    """Deleting after an evacuation cleans the new host; the dead host's copy still goes when it returns."""
    uuid = _on(cloud, "h1")
    _dead(cloud, "h1")
    cloud.evacuate(uuid, host="h2")
    cloud.delete(uuid)
    assert not fakes["h2"].domain_exists(uuid) and cloud.store.claims.of(uuid) == []
    assert cloud.hosts.destroy_evacuated("h1") == [uuid] and not fakes["h1"].domain_exists(uuid)


BAD_CLI: list[Any] = [
    ("evacuate-host-up", ["evacuate", "{uuid}"]),
    ("evacuate-to-unknown", ["evacuate", "{uuid}", "--host", "nowhere"]),
    ("evacuate-empty-host", ["evacuate", "{uuid}", "--host", ""]),
    ("evacuate-bad-uuid", ["evacuate", "not-a-uuid"]),
    ("host-evacuate-up", ["host", "evacuate", "h1"]),
    ("host-evacuate-unknown", ["host", "evacuate", "nowhere"]),
    ("fence-no-reason", ["host", "fence", "h1"]),
    ("fence-empty-reason", ["host", "fence", "h1", "--reason", ""]),
    ("fence-unknown", ["host", "fence", "nowhere", "--reason", "dead"]),
    ("fence-bad-actor", ["host", "fence", "h1", "--reason", "dead", "--actor", ""]),
    ("unfence-unknown", ["host", "unfence", "nowhere"]),
]


@pytest.mark.parametrize("argv", [pytest.param(a, id=i) for i, a in BAD_CLI])
def test_bad_input_to_the_new_commands_exits_2_and_changes_nothing(
    world: World, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Refused input to fence, unfence, evacuate and host evacuate: exit 2, one typed error, every table as it was."""
    before = dump(world.folder)
    code = main([*_argv(world, argv), "--json"])
    out, err = capsys.readouterr()
    _assert_typed_error(code, out, err)
    assert dump(world.folder) == before


def test_cli_fence_evacuate_and_host_list(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI: fence shows in host show and list; host evacuate moves the instance and says data is lost."""
    assert main(["host", "fence", "h1", "--reason", "PSU dead", "--actor", "ops"]) == 0
    assert "FENCED by ops" in capsys.readouterr().out
    assert main(["host", "list"]) == 0
    assert "FENCED by ops" in capsys.readouterr().out and main(["host", "show", "h1", "--json"]) == 0
    assert '"fenced_by": "ops"' in capsys.readouterr().out
    assert main(["host", "evacuate", "h1"]) == 2  # fenced but still up
    assert "not down" in capsys.readouterr().err
    with Engine(f"sqlite:///{world.folder / 'lifecycle.db'}") as engine:
        _down(engine, "h1")
    assert main(["host", "evacuate", "h1"]) == 0
    out = capsys.readouterr().out
    assert f"{world.uuid} evacuated now on h2" in out and "data on the dead host's disk is lost" in out
    assert main(["host", "unfence", "h1"]) == 0
    assert "FENCED" not in capsys.readouterr().out
