"""Defects the stateful test found, each pinned by a minimal reproduction.

An open defect's test is strict xfail, naming the defect: it passes (and so
fails the suite) the day the defect is fixed, and then loses its marker and
stays as a regression test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifecycle import Engine, Flavor, InvalidState, Settings, TaskFailed, VmState, upgrade
from lifecycle.drivers.fake import FakeDriver, SimulatedCrash
from lifecycle.errors import DriverError
from lifecycle.records import Host
from tests.images import fake_image
from tests.invariants import check_claims
from tests.test_stateful import expire_leases

SMALL = Flavor(1, 64, 1, name="small")
MEDIUM = Flavor(2, 128, 1, name="medium")


class Cloud:
    """Engines over one SQLite file and fake hosts with tracked resources that survive a restart."""

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path / 'lifecycle.db'}"
        upgrade(self.url)
        self.fakes: dict[str, FakeDriver] = {}
        self.engines: list[Engine] = []

    def factory(self, host: Host) -> FakeDriver:
        return self.fakes.setdefault(host.name, FakeDriver(host.name))

    def engine(self) -> Engine:
        """Open an engine (always the same owner: a restarted process)."""
        engine = Engine(self.url, driver_factory=self.factory, owner="finding", settings=Settings(shutdown_timeout=0))
        self.engines.append(engine)
        return engine

    def restart(self) -> Engine:
        """Open a new engine once the dead one's leases ran out, and recover."""
        engine = self.engine()
        expire_leases(engine)
        engine.recover()
        return engine

    def setup(self, hosts: tuple[str, ...] = ("h1",)) -> Engine:
        """Open the first engine with ``hosts`` registered, up and tracked, and the cirros image."""
        engine = self.engine()
        for name in hosts:
            engine.hosts.add(name, "fake://", vcpus=4, memory_mb=512, disk_gb=3)
            engine.hosts.heartbeat(name)
            engine.hosts.driver(name)
        engine.images.add("cirros", fake_image("cirros"))
        return engine


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    """A database and fake hosts; every engine opened is closed at the end."""
    made = Cloud(tmp_path)
    yield made
    for engine in made.engines:
        engine.close()


def test_create_resumed_after_a_crash_in_the_failed_spawn_cleanup_holds_its_claim(cloud: Cloud) -> None:
    """A build that crashed while destroying a failed spawn's leftover, once recovered onto its host, holds a claim there."""
    first = cloud.setup()
    cloud.fakes["h1"].faults.fail_next("spawn")
    cloud.fakes["h1"].faults.crash_after("destroy")
    uuid = "00000000-0000-4000-8000-000000000001"
    with pytest.raises(SimulatedCrash):
        first.create("vm", host="h1", flavor=SMALL, image="cirros", uuid=uuid)
    second = cloud.restart()
    instance = second.get(uuid)
    assert (instance.vm_state.value, instance.host) == ("active", "h1")
    assert second.store.claims.of(uuid) == ["h1"]
    assert second.hosts.get("h1").vcpus_used == 1


def test_soft_delete_of_a_resized_instance_leaves_nothing_on_the_source(cloud: Cloud) -> None:
    """Soft delete of a resized instance confirms the move first (as delete and Nova do), or is refused."""
    engine = cloud.setup(("h1", "h2"))
    uuid = engine.create("vm", host="h1", flavor=SMALL, image="cirros").instance_uuid
    engine.resize(uuid, MEDIUM)
    try:
        engine.soft_delete(uuid)
    except InvalidState:  # refusing it (confirm or revert first) would be a fix too
        assert engine.get(uuid).vm_state is VmState.RESIZED
        return
    assert engine.store.claims.of(uuid) == ["h2"] and cloud.fakes["h1"].kept_disks() == []
    engine.restore(uuid)
    assert engine.store.claims.of(uuid) == ["h2"] and engine.hosts.get("h1").vcpus_used == 0


def test_create_failing_at_its_final_power_read_keeps_no_host_claim_or_domain(cloud: Cloud) -> None:
    """A build whose final power read raised either succeeds or ends error with no host, claim or domain."""
    engine = cloud.setup()
    cloud.fakes["h1"].faults.fail_next("get_info")
    uuid = "00000000-0000-4000-8000-000000000001"
    try:
        engine.create("vm", host="h1", flavor=SMALL, image="cirros", uuid=uuid)
    except TaskFailed:
        instance = engine.get(uuid)
        assert (instance.vm_state, instance.host) == (VmState.ERROR, None)
        assert engine.store.claims.of(uuid) == [] and not cloud.fakes["h1"].domain_exists(uuid)
    else:
        assert engine.get(uuid).vm_state is VmState.ACTIVE and engine.store.claims.of(uuid) == ["h1"]


def test_resize_failing_at_its_final_power_read_keeps_claims_consistent(cloud: Cloud) -> None:
    """A resize whose final power read raised does not end active on the new host with the old flavor and two claims."""
    engine = cloud.setup(("h1", "h2"))
    uuid = engine.create("vm", host="h1", flavor=SMALL, image="cirros").instance_uuid
    cloud.fakes["h2"].faults.fail_next("get_info")
    with contextlib.suppress(TaskFailed):
        engine.resize(uuid, MEDIUM)
    check_claims(engine.store)


def test_soft_delete_of_a_resized_instance_failing_after_the_confirm_leaves_it_unresized(cloud: Cloud) -> None:
    """A soft delete that confirmed the move and then failed to power off does not leave the instance resized."""
    engine = cloud.setup(("h1", "h2"))
    uuid = engine.create("vm", host="h1", flavor=SMALL, image="cirros").instance_uuid
    engine.resize(uuid, MEDIUM)
    cloud.fakes["h2"].faults.fail_next("power_off")
    with pytest.raises(TaskFailed):
        engine.soft_delete(uuid)
    instance = engine.get(uuid)
    assert instance.vm_state is not VmState.RESIZED or engine.store.moves.open_of(uuid) is not None
    check_claims(engine.store)


def test_revert_failing_on_the_source_leaves_the_instance_where_its_claim_and_disk_are(cloud: Cloud) -> None:
    """A revert whose restore on the source failed leaves the instance recorded on a host it holds a claim on."""
    engine = cloud.setup(("h1", "h2"))
    uuid = engine.create("vm", host="h1", flavor=SMALL, image="cirros").instance_uuid
    engine.resize(uuid, MEDIUM)
    cloud.fakes["h1"].faults.fail_next("finish_revert_migration")
    with pytest.raises(TaskFailed):
        engine.revert_resize(uuid)
    instance = engine.get(uuid)
    assert instance.host in engine.store.claims.of(uuid), (instance.vm_state, instance.host)
    check_claims(engine.store)


def test_an_instance_brought_back_from_a_failed_move_holds_only_its_own_claim(cloud: Cloud) -> None:
    """Rebuilding an instance left error by a failed move either is refused or leaves one claim, on its host, of its flavor."""
    engine = cloud.setup(("h1", "h2"))
    uuid = engine.create("vm", host="h1", flavor=SMALL, image="cirros").instance_uuid
    cloud.fakes["h2"].faults.fail_next("finish_migration")
    with pytest.raises(TaskFailed):
        engine.resize(uuid, MEDIUM)
    assert engine.get(uuid).vm_state is VmState.ERROR
    try:
        engine.rebuild(uuid)
    except InvalidState:  # refusing until the move is confirmed or reverted would be a fix too
        return
    check_claims(engine.store)


@pytest.mark.parametrize(
    "faults",
    [
        [("migrate_disk_and_power_off", OSError(5, "Input/output error"))],
        [("migrate_disk_and_power_off", DriverError("disk busy")), ("finish_revert_migration", RuntimeError("bug"))],
    ],
    ids=["leaving-raises-OSError", "roll-back-raises-RuntimeError"],
)
def test_a_move_failing_with_any_exception_before_the_disk_left_is_rolled_back(
    cloud: Cloud, faults: list[tuple[str, Exception]]
) -> None:
    """A resize failing before its disk left the source, whatever the exception, keeps no claim on the destination."""
    engine = cloud.setup(("h1", "h2"))
    uuid = engine.create("vm", host="h1", flavor=SMALL, image="cirros").instance_uuid
    for call, error in faults:
        cloud.fakes["h1"].faults.fail_next(call, error)
    with pytest.raises(TaskFailed):
        engine.resize(uuid, MEDIUM)
    assert engine.store.claims.of(uuid) == ["h1"] and engine.store.moves.open_of(uuid) is None
    check_claims(engine.store)
