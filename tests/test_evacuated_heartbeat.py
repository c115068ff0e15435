# ruff: noqa: F811  (the `cloud` fixture is imported from tests/test_evacuate.py and named by each test)
"""Evacuated copies cannot come back: a heartbeat destroys them first or is refused; the scheduler avoids their host."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lifecycle import DriverError, DriverUnavailable, Engine, Flavor, TaskFailed, VmState
from lifecycle.cli import main
from lifecycle.config import Settings
from lifecycle.daemon import HostWorker
from lifecycle.drivers.base import Attempt, HostObject
from lifecycle.drivers.fake import FakeDriver
from lifecycle.errors import EvacuatedCopiesPending
from lifecycle.scheduler import EVACUATED_COPIES, HostState, Request, SchedulerSettings, filter_hosts
from lifecycle.states import MigrationStatus
from lifecycle.store import upgrade
from tests.conftest import Fakes, fake_image
from tests.invariants import check_invariants
from tests.test_cli_bad_input import dump
from tests.test_evacuate import cloud  # noqa: F401  (the fixture: three fake hosts with room, all up)

SMALL = Flavor(1, 512, 1)


def _evacuated_then_unfenced(engine: Engine, host: str = "h1", to: str = "h2") -> str:
    """Create an instance on ``host``, let the host die, evacuate the instance to ``to``, and lift the fence."""
    uuid = engine.create("vm", host=host, flavor=SMALL, image="cirros").instance_uuid
    stale = datetime.now(UTC) - timedelta(seconds=engine.settings.host_down_after + 5)
    engine.store.hosts.update(host, last_heartbeat=stale)
    engine.hosts.fence(host, reason="power supply failed", actor="ops")
    engine.evacuate(uuid, host=to)
    engine.hosts.unfence(host, actor="ops")
    return uuid


def _notes(engine: Engine, uuid: str) -> list[Any]:
    return [e for e in engine.history(uuid) if e.operation == "destroy_evacuated"]


def test_heartbeat_destroys_the_pending_copy_first_and_audits_it(cloud: Engine, fakes: Fakes) -> None:
    """Engine.hosts.heartbeat of a host holding an evacuated copy destroys domain and disk, audits it, completes the record."""
    uuid = _evacuated_then_unfenced(cloud)
    assert fakes["h1"].domain_exists(uuid)  # the stale copy a later move or unshelve to h1 would find
    before = cloud.hosts.get("h1").last_heartbeat
    host = cloud.hosts.heartbeat("h1")
    assert not fakes["h1"].domain_exists(uuid) and fakes["h2"].domain_exists(uuid)
    assert not [c for c in fakes["h1"].calls if c.startswith("power_on")]
    (note,) = _notes(cloud, uuid)
    assert note.cause == "sync" and "on h1" in (note.message or "") and "lives on h2" in (note.message or "")
    assert [m.status for m in cloud.migrations()] == [MigrationStatus.COMPLETED]
    assert host.last_heartbeat is not None and before is not None and host.last_heartbeat > before
    cloud.hosts.heartbeat("h1")
    assert len(_notes(cloud, uuid)) == 1  # nothing pending any more: nothing destroyed or audited again


def test_heartbeat_is_refused_and_writes_nothing_while_the_hypervisor_cannot_destroy_the_copy(
    cloud: Engine, fakes: Fakes
) -> None:
    """A silent hypervisor: EvacuatedCopiesPending names the copy and the cause; heartbeat, metrics and record unchanged."""
    uuid = _evacuated_then_unfenced(cloud)
    before, history = cloud.hosts.get("h1"), cloud.history(uuid)
    fakes["h1"].unreachable = True
    with pytest.raises(EvacuatedCopiesPending) as refused:
        cloud.hosts.heartbeat("h1", metrics={"cpu.percent": 5.0})
    error = refused.value
    assert isinstance(error, DriverError) and isinstance(error.__cause__, DriverUnavailable)
    assert (error.host, error.instances) == ("h1", [uuid])
    assert uuid in str(error) and "DriverUnavailable" in str(error) and "no heartbeat was recorded" in str(error)
    assert cloud.hosts.get("h1") == before  # last_heartbeat and metrics as they were
    assert cloud.history(uuid) == history and [m.status for m in cloud.migrations()] == [MigrationStatus.DONE]
    fakes["h1"].unreachable = False
    assert fakes["h1"].domain_exists(uuid)
    cloud.hosts.heartbeat("h1")  # it answers again: the copy goes, the heartbeat is written
    assert not fakes["h1"].domain_exists(uuid) and cloud.hosts.get("h1").last_heartbeat != before.last_heartbeat
    fakes["h1"].unreachable = True
    cloud.hosts.heartbeat("h1")  # nothing pending: a heartbeat asks nothing of the hypervisor


def test_a_copy_destroyed_before_the_failure_is_done_and_only_the_rest_is_named(
    cloud: Engine, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hypervisor failing midway: the copies destroyed are audited and completed; the error names only the others."""
    later = cloud.create("a", host="h1", flavor=SMALL, image="cirros").instance_uuid
    earlier = _evacuated_then_unfenced(cloud)  # h1 stays down: it can be fenced and evacuated again
    cloud.hosts.fence("h1", reason="again", actor="ops")
    cloud.evacuate(later, host="h3")
    cloud.hosts.unfence("h1", actor="ops")
    remove = fakes["h1"].remove

    def remove_all_but_later(uuid: str, objects: list[HostObject]) -> list[str]:
        if uuid == later:
            raise DriverUnavailable("h1 went silent", call="remove")
        return remove(uuid, objects)

    monkeypatch.setattr(fakes["h1"], "remove", remove_all_but_later)
    beat = cloud.hosts.get("h1").last_heartbeat
    with pytest.raises(EvacuatedCopiesPending) as refused:
        cloud.hosts.heartbeat("h1")
    assert refused.value.instances == [later] and earlier not in str(refused.value)
    assert cloud.hosts.get("h1").last_heartbeat == beat
    assert not fakes["h1"].domain_exists(earlier) and len(_notes(cloud, earlier)) == 1
    status = {m.instance_uuid: m.status for m in cloud.migrations()}
    assert status == {earlier: MigrationStatus.COMPLETED, later: MigrationStatus.DONE}


def test_the_daemon_heartbeat_refuses_a_copy_evacuated_after_its_clear(cloud: Engine, fakes: Fakes) -> None:
    """A host worker already cleared: its next heartbeat still destroys a new copy first, and writes none while it cannot."""
    worker = HostWorker(cloud, "h1", image_cache_interval=3600)
    worker.heartbeat()
    assert worker.cleared.is_set()
    uuid = _evacuated_then_unfenced(cloud)
    beat = cloud.hosts.get("h1").last_heartbeat
    fakes["h1"].faults.fail_next("remove", DriverUnavailable("h1 went silent", call="remove"))
    worker.heartbeat()  # the ping answers; destroying the copy does not
    assert cloud.hosts.get("h1").last_heartbeat == beat and not worker.cleared.is_set()
    assert fakes["h1"].domain_exists(uuid)
    worker.heartbeat()
    assert not fakes["h1"].domain_exists(uuid) and cloud.hosts.get("h1").last_heartbeat != beat
    assert worker.cleared.is_set() and len(_notes(cloud, uuid)) == 1


@pytest.mark.parametrize("filters", ["default", "no-compute-filter"])
def test_the_scheduler_never_places_on_a_host_holding_an_evacuated_copy(
    db_url: str, fakes: Fakes, filters: str
) -> None:
    """Up (a heartbeat from before the evacuation) or down with ComputeFilter off, named or not: such a host is refused."""
    settings: dict[str, Any] = {"shutdown_timeout": 0.0}
    if filters == "no-compute-filter":
        chosen = tuple(f for f in SchedulerSettings().filters if f != "ComputeFilter")
        settings["scheduler"] = SchedulerSettings(filters=chosen)
    engine = Engine(db_url, driver_factory=fakes.factory, settings=Settings(**settings))
    try:
        for host in ("h1", "h2"):
            engine.hosts.add(host, "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
            engine.hosts.heartbeat(host)
        engine.images.add("cirros", fake_image("cirros"))
        uuid = _evacuated_then_unfenced(engine)
        if filters == "default":  # up: a heartbeat written before the evacuation finished, say
            engine.store.hosts.update("h1", last_heartbeat=datetime.now(UTC))
        for _ in range(3):  # h1 has the most free memory: the RAM weigher would pick it
            assert engine.get(engine.create("web", flavor=SMALL, image="cirros").instance_uuid).host == "h2"
        with pytest.raises(TaskFailed, match=r"NoValidHost.*h1: holds old copies of instances evacuated"):
            engine.create("named", host="h1", flavor=SMALL, image="cirros")
        with pytest.raises(TaskFailed, match=r"NoValidHost.*h1: holds old copies of instances evacuated"):
            engine.migrate(uuid, host="h1")
        with pytest.raises(TaskFailed, match=r"NoValidHost.*h1: holds old copies of instances evacuated"):
            engine.migrate(uuid)  # the only other host
        assert engine.get(uuid).host == "h2" and engine.get(uuid).vm_state is VmState.ACTIVE
        assert fakes["h1"].domain_exists(uuid)
        engine.hosts.heartbeat("h1")  # destroys the copy: h1 is a destination again
        engine.migrate(uuid, host="h1")
        assert engine.get(uuid).host == "h1"
        check_invariants(engine.store)
    finally:
        engine.close()


def test_the_pure_scheduler_refuses_a_host_with_evacuated_copies_whatever_its_filters() -> None:
    """filter_hosts refuses HostState(evacuated_copies=True) before any filter, even with none enabled."""
    hosts = [HostState("a", evacuated_copies=True), HostState("b")]
    passed, reasons = filter_hosts(hosts, Request(1, 512, 1), SchedulerSettings(filters=()))
    assert [h.name for h in passed] == ["b"] and reasons == {"a": EVACUATED_COPIES}


# -- the CLI --------------------------------------------------------------------------


@pytest.fixture
def evacuated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A database (the CLI's default) with h1 and h2 kept in state files, and an instance evacuated from h1 to h2."""
    url = f"sqlite:///{tmp_path / 'lifecycle.db'}"
    upgrade(url)
    with Engine(url, settings=Settings(shutdown_timeout=0.0)) as engine:
        for host in ("h1", "h2"):
            engine.hosts.add(host, f"fake://{tmp_path / host}.json", vcpus=8, memory_mb=8192, disk_gb=80)
            engine.hosts.heartbeat(host)
        engine.images.add("cirros", fake_image("cirros"))
        uuid = _evacuated_then_unfenced(engine)
    monkeypatch.setenv("LIFECYCLE_DB_URL", url)
    return uuid


def _h1_domains(tmp_path: Path) -> list[str]:
    return sorted(json.loads((tmp_path / "h1.json").read_text())["domains"])


def test_cli_heartbeat_of_an_unanswering_host_exits_1_naming_the_copy_and_writes_nothing(
    evacuated: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`host heartbeat h1` whose hypervisor is silent exits 1 (a driver error) with one line naming the copy, and no row changes."""
    init = FakeDriver.__init__

    def silent(self: FakeDriver, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.unreachable = True

    monkeypatch.setattr(FakeDriver, "__init__", silent)
    before = dump(tmp_path)
    code = main(["host", "heartbeat", "h1", "--json"])
    out, err = capsys.readouterr()
    assert code == 1, err
    data = json.loads(out)
    assert data["error"] == "EvacuatedCopiesPending" and evacuated in data["message"]
    assert err.startswith("error: cannot heartbeat host h1") and err.count("\n") == 1 and evacuated in err
    assert "Traceback" not in err and dump(tmp_path) == before
    assert _h1_domains(tmp_path) == [evacuated]


def test_cli_heartbeat_destroys_the_copy_and_records_the_heartbeat(
    evacuated: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`host heartbeat h1` with its hypervisor answering destroys the evacuated copy, audits it, and exits 0."""
    assert _h1_domains(tmp_path) == [evacuated]
    assert main(["host", "heartbeat", "h1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["last_heartbeat"] is not None
    assert _h1_domains(tmp_path) == []
    assert main(["history", evacuated, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["operation"] for r in rows].count("destroy_evacuated") == 1


def test_destroying_the_evacuated_copy_spares_what_a_later_task_made_there(cloud: Engine, fakes: Fakes) -> None:
    """Only what tasks before the evacuation made goes: a later task's volume on the host (a move on its way) stays."""
    uuid = _evacuated_then_unfenced(cloud)
    later = cloud.stop(uuid)  # a task of the instance's new life
    h1 = fakes["h1"]
    arriving = f"{uuid}.{Attempt(later.id, 0).tag}"
    with h1._state():
        h1._volumes[arriving] = "a copy on its way here"
    old = [o.name for o in h1.objects(uuid)]
    assert len(old) == 3  # the evacuated domain, its disk, and the arriving volume
    cloud.hosts.heartbeat("h1")
    assert [o.name for o in h1.objects(uuid)] == [arriving] and len(_notes(cloud, uuid)) == 1
