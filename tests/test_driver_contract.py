"""The driver contract suite: the fake and the libvirt driver on real QEMU both pass it.

Each test pins one postcondition or idempotency promise from drivers/base.py.

libvirt's test driver (``test:///``) is not a contract host: it has pools and
volumes but no volume upload, download or resize, and the libvirt driver puts
every byte of a disk through those (drivers/storage.py), so it cannot spawn
there. What the test driver still pins without a spawn is in
tests/test_libvirt.py.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifecycle.drivers.base import Attempt, DomainSpec, Driver, LifecycleEvent, RebootType, Transition
from lifecycle.drivers.fake import FakeDriver
from lifecycle.drivers.libvirt import LibvirtDriver
from lifecycle.errors import DomainNotFound, DriverError, Fenced, StaleObject
from lifecycle.states import PowerState
from tests.conftest import QEMU_URI, qemu_ready
from tests.test_storage import remove_pools

P = PowerState


@pytest.fixture(
    params=[
        "fake",
        pytest.param("libvirt-qemu", marks=[pytest.mark.qemu, pytest.mark.slow]),
    ]
)
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    """Each driver under the contract, on a private, empty host."""
    drv = _open(request.param, tmp_path, "instances")
    yield drv
    _close(drv)


def _open(kind: str, tmp_path: Path, name: str) -> Driver:
    """Open one host of a driver kind, with its own instances path."""
    if kind == "fake":
        return FakeDriver(name)
    qemu_ready()
    return LibvirtDriver(QEMU_URI, tmp_path / name, domain_type="qemu", soft_reboot_seconds=1)


def _close(drv: Driver) -> None:
    """Destroy the host's domains; on libvirt also remove its pools with their volumes."""
    try:
        for uuid in _owned(drv):
            drv.destroy(uuid)
    finally:
        if isinstance(drv, LibvirtDriver):
            remove_pools(drv.storage, drv.uri)
        drv.close()


def _made_here(drv: Driver, uuid: str) -> bool:
    """Whether this host made the domain: QEMU_URI is shared with other tests and processes, private hosts are not.

    On the shared host a domain is this host's when its root disk is a volume of this host's disks pool.
    """
    if not isinstance(drv, LibvirtDriver) or drv.uri != QEMU_URI:
        return True
    return any(o.kind == "volume" for o in drv.objects(uuid))


def _owned(drv: Driver) -> dict[str, PowerState]:
    """The host's listing of its own domains (on the shared host, only those this host made)."""
    return {uuid: power for uuid, power in drv.list_instances().owned.items() if _made_here(drv, uuid)}


@pytest.fixture
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> DomainSpec:
    """A small domain on a real qcow2 base for libvirt drivers (the fake needs no file)."""
    needs_file = "fake" not in request.node.callspec.params.get("driver", "fake")
    image = request.getfixturevalue("base_image") if needs_file else tmp_path / "no-such-base.qcow2"
    return DomainSpec(
        uuid=str(uuidlib.uuid4()),
        name="contract-vm",
        vcpus=1,
        memory_mb=64,
        root_gb=1,
        image_path=str(image),
        image_format="qcow2",
    )


def test_spawn_runs_the_domain_and_repeating_is_safe(driver: Driver, spec: DomainSpec) -> None:
    """After spawn the domain runs; a second spawn leaves it running."""
    driver.spawn(spec)
    driver.spawn(spec)
    assert driver.get_info(spec.uuid) is P.RUNNING
    assert _owned(driver) == {spec.uuid: P.RUNNING}


def test_spawn_without_power_on_leaves_it_off(driver: Driver, spec: DomainSpec) -> None:
    """spawn(power_on=False) defines the domain shut down."""
    driver.spawn(spec, power_on=False)
    assert driver.get_info(spec.uuid) is P.SHUTDOWN


def test_destroy_removes_the_domain_and_is_idempotent(driver: Driver, spec: DomainSpec) -> None:
    """After destroy the domain is gone; destroying again or a never-defined uuid succeeds."""
    driver.spawn(spec)
    driver.destroy(spec.uuid)
    driver.destroy(spec.uuid)
    driver.destroy(str(uuidlib.uuid4()))
    with pytest.raises(DomainNotFound):
        driver.get_info(spec.uuid)
    assert spec.uuid not in driver.list_instances().owned


def test_power_off_then_on(driver: Driver, spec: DomainSpec) -> None:
    """power_off leaves it shut down (twice is safe); power_on runs it (twice is safe)."""
    driver.spawn(spec)
    driver.power_off(spec.uuid, timeout=0, retry_interval=0)
    driver.power_off(spec.uuid, timeout=0, retry_interval=0)
    assert driver.get_info(spec.uuid) is P.SHUTDOWN
    driver.power_on(spec)
    driver.power_on(spec)
    assert driver.get_info(spec.uuid) is P.RUNNING


def test_pause_unpause(driver: Driver, spec: DomainSpec) -> None:
    """Pause freezes (repeat safe); unpause thaws (repeat safe)."""
    driver.spawn(spec)
    driver.pause(spec.uuid)
    driver.pause(spec.uuid)
    assert driver.get_info(spec.uuid) is P.PAUSED
    driver.unpause(spec.uuid)
    driver.unpause(spec.uuid)
    assert driver.get_info(spec.uuid) is P.RUNNING


def test_pause_of_a_stopped_domain_is_a_driver_error(driver: Driver, spec: DomainSpec) -> None:
    """Pausing a shut-down guest raises DriverError and leaves it shut down."""
    driver.spawn(spec, power_on=False)
    with pytest.raises(DriverError):
        driver.pause(spec.uuid)
    assert driver.get_info(spec.uuid) is P.SHUTDOWN


def test_suspend_resume(driver: Driver, spec: DomainSpec) -> None:
    """Suspend is a managed save (power SHUTDOWN, as Nova on libvirt); resume runs it again."""
    driver.spawn(spec)
    driver.suspend(spec.uuid)
    driver.suspend(spec.uuid)
    assert driver.get_info(spec.uuid) is P.SHUTDOWN
    driver.resume(spec)
    assert driver.get_info(spec.uuid) is P.RUNNING


def test_reboot_hard_starts_a_stopped_domain_soft_refuses(driver: Driver, spec: DomainSpec) -> None:
    """A soft reboot needs a running guest; a hard reboot works from off and leaves it running."""
    driver.spawn(spec, power_on=False)
    with pytest.raises(DriverError):
        driver.reboot(spec, RebootType.SOFT)
    driver.reboot(spec, RebootType.HARD)
    assert driver.get_info(spec.uuid) is P.RUNNING
    driver.reboot(spec, RebootType.SOFT)
    assert driver.get_info(spec.uuid) is P.RUNNING


def test_rescue_and_unrescue_end_running(driver: Driver, spec: DomainSpec) -> None:
    """rescue and unrescue each leave the domain running."""
    driver.spawn(spec)
    for call in (driver.rescue, driver.unrescue):
        call(spec)
        assert driver.get_info(spec.uuid) is P.RUNNING


@pytest.mark.parametrize("call", ["power_on", "resume", "rescue", "unrescue", "reboot"])
def test_calls_on_a_missing_domain_raise_domain_not_found(driver: Driver, spec: DomainSpec, call: str) -> None:
    """Operations that need a domain raise DomainNotFound, not a generic error."""
    with pytest.raises(DomainNotFound):
        if call == "reboot":
            driver.reboot(spec, RebootType.HARD)
        else:
            getattr(driver, call)(spec)


def test_listing_is_one_call_for_the_host(driver: Driver, spec: DomainSpec) -> None:
    """list_instances returns every owned domain's power state at once."""
    second = dataclasses.replace(spec, uuid=str(uuidlib.uuid4()), name="second")
    driver.spawn(spec)
    driver.spawn(second, power_on=False)
    assert _owned(driver) == {spec.uuid: P.RUNNING, second.uuid: P.SHUTDOWN}


def test_console_has_a_port(driver: Driver, spec: DomainSpec) -> None:
    """A running domain reports a VNC host and port (a driver that never assigns one says so)."""
    driver.spawn(spec)
    if not driver.allocates_console_ports:
        with pytest.raises(DriverError, match="no VNC port"):
            driver.get_vnc_console(spec.uuid)
        return
    console = driver.get_vnc_console(spec.uuid)
    assert console.host and console.port >= 5900


def test_events_reach_the_listener(driver: Driver, spec: DomainSpec) -> None:
    """Power changes are delivered to the registered listener."""
    seen: list[LifecycleEvent] = []
    arrived = threading.Event()

    def listener(event: LifecycleEvent) -> None:
        seen.append(event)
        if event.uuid == spec.uuid and event.transition is Transition.STOPPED:
            arrived.set()

    driver.register_event_listener(listener)
    driver.spawn(spec)
    driver.power_off(spec.uuid, timeout=0, retry_interval=0)
    assert arrived.wait(10)
    assert {e.uuid for e in seen if _made_here(driver, e.uuid)} == {spec.uuid}
    driver.register_event_listener(None)


@pytest.fixture(
    params=[
        "fake",
        pytest.param("libvirt-qemu", marks=[pytest.mark.qemu, pytest.mark.slow]),
    ]
)
def two_hosts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Driver, Driver]]:
    """A source and a destination host of the same driver kind, each with its own instances path."""
    source, dest = _open(request.param, tmp_path, "source"), _open(request.param, tmp_path, "dest")
    yield source, dest
    _close(source)
    _close(dest)


@pytest.fixture
def move_spec(request: pytest.FixtureRequest, tmp_path: Path) -> DomainSpec:
    """A small domain on a real qcow2 base for libvirt drivers."""
    needs_file = "fake" not in request.node.callspec.params.get("two_hosts", "fake")
    image = request.getfixturevalue("base_image") if needs_file else tmp_path / "no-such-base.qcow2"
    return DomainSpec(str(uuidlib.uuid4()), "mover", 1, 64, 1, str(image), "qcow2")


def test_move_then_confirm(two_hosts: tuple[Driver, Driver], move_spec: DomainSpec) -> None:
    """The disk leaves the source (kept aside), runs bigger on the destination; confirm drops the kept copy."""
    source, dest = two_hosts
    source.spawn(move_spec)
    kept = source.migrate_disk_and_power_off(move_spec.uuid, timeout=0, retry_interval=0)
    assert source.migrate_disk_and_power_off(move_spec.uuid, timeout=0, retry_interval=0) == kept
    assert move_spec.uuid not in source.list_instances().owned
    bigger = dataclasses.replace(move_spec, memory_mb=128, root_gb=2)
    read = functools.partial(source.read_disk, move_spec.uuid)
    dest.finish_migration(bigger, read, power_on=True)
    dest.finish_migration(bigger, read, power_on=True)
    assert dest.get_info(move_spec.uuid) is P.RUNNING
    source.confirm_migration(move_spec.uuid)
    source.confirm_migration(move_spec.uuid)
    with pytest.raises(DomainNotFound):
        source.finish_revert_migration(move_spec, power_on=True)


def test_move_then_revert(two_hosts: tuple[Driver, Driver], move_spec: DomainSpec) -> None:
    """Revert destroys the destination's copy and brings the source back as it was, stopped if asked."""
    source, dest = two_hosts
    source.spawn(move_spec)
    source.migrate_disk_and_power_off(move_spec.uuid, timeout=0, retry_interval=0)
    dest.finish_migration(move_spec, functools.partial(source.read_disk, move_spec.uuid), power_on=False)
    assert dest.get_info(move_spec.uuid) is P.SHUTDOWN
    dest.destroy(move_spec.uuid)
    source.finish_revert_migration(move_spec, power_on=False)
    source.finish_revert_migration(move_spec, power_on=False)
    assert source.get_info(move_spec.uuid) is P.SHUTDOWN
    source.power_on(move_spec)
    assert source.get_info(move_spec.uuid) is P.RUNNING


def test_snapshot_then_spawn_from_it_on_another_host(
    two_hosts: tuple[Driver, Driver], move_spec: DomainSpec, tmp_path: Path
) -> None:
    """A stopped guest's disk becomes a whole image (a running one is refused); another host spawns from it, twice safely."""
    source, dest = two_hosts
    source.spawn(move_spec)
    target = tmp_path / "shelved.qcow2"
    with pytest.raises(DriverError, match="running"):
        source.snapshot(move_spec, target)
    assert not target.exists() and not list(tmp_path.glob("shelved.qcow2.*"))  # nothing half-written
    source.power_off(move_spec.uuid, timeout=0, retry_interval=0)
    source.snapshot(move_spec, target)
    source.snapshot(move_spec, target)  # repeat: written again
    assert target.is_file() and not list(tmp_path.glob("shelved.qcow2.*"))
    source.destroy(move_spec.uuid)
    dest.spawn_from_snapshot(move_spec, target, power_on=False)
    assert dest.get_info(move_spec.uuid) is P.SHUTDOWN
    dest.spawn_from_snapshot(move_spec, target, power_on=True)
    assert dest.get_info(move_spec.uuid) is P.RUNNING
    assert _owned(dest) == {move_spec.uuid: P.RUNNING}


def test_snapshot_of_a_missing_disk_is_domain_not_found(driver: Driver, spec: DomainSpec, tmp_path: Path) -> None:
    """snapshot names a uuid with no disk here as DomainNotFound and writes nothing."""
    with pytest.raises(DomainNotFound):
        driver.snapshot(spec, tmp_path / "nothing.qcow2")
    assert not (tmp_path / "nothing.qcow2").exists()


# -- ownership on the hypervisor ----------------------------------------------------------


def _by(spec: DomainSpec, task: str, epoch: int = 0) -> DomainSpec:
    """``spec`` acting for ``task`` at ``epoch``."""
    return dataclasses.replace(spec, attempt=Attempt(task, epoch))


def _volumes(driver: Driver, uuid: str) -> set[str]:
    return {o.name for o in driver.objects(uuid) if o.kind == "volume"}


def test_spawn_never_adopts_nor_starts_another_attempts_domain(driver: Driver, spec: DomainSpec) -> None:
    """A domain made by one task is never adopted nor started by another task's spawn: StaleObject, nothing changed."""
    disk = driver.spawn(_by(spec, str(uuidlib.uuid4())), power_on=False)
    assert disk.startswith(spec.uuid + ".")  # the volume names its attempt
    with pytest.raises(StaleObject):
        driver.spawn(_by(spec, str(uuidlib.uuid4())))
    assert driver.get_info(spec.uuid) is P.SHUTDOWN and _volumes(driver, spec.uuid) == {disk}


def test_a_later_epoch_takes_the_domain_and_fences_the_earlier(driver: Driver, spec: DomainSpec) -> None:
    """Epoch 1 of a task takes epoch 0's domain (same disk); epoch 0 coming back is Fenced and changes nothing."""
    task = str(uuidlib.uuid4())
    disk = driver.spawn(_by(spec, task, 0), power_on=False)
    assert driver.spawn(_by(spec, task, 1), power_on=False) == disk
    with pytest.raises(Fenced):
        driver.spawn(_by(spec, task, 0))
    assert driver.get_info(spec.uuid) is P.SHUTDOWN
    [domain] = [o for o in driver.objects(spec.uuid) if o.kind == "domain"]
    assert (domain.task_tag, domain.epoch) == (Attempt(task, 1).task_tag, 1)


def test_destroy_for_an_attempt_touches_only_its_tasks_objects(driver: Driver, spec: DomainSpec) -> None:
    """destroy(attempt=another task) leaves the domain and its disk; destroy without an attempt removes all."""
    disk = driver.spawn(_by(spec, str(uuidlib.uuid4())))
    driver.destroy(spec.uuid, attempt=Attempt(str(uuidlib.uuid4()), 0))
    assert driver.get_info(spec.uuid) is P.RUNNING and _volumes(driver, spec.uuid) == {disk}
    driver.destroy(spec.uuid)
    assert driver.objects(spec.uuid) == []


def test_remove_destroys_what_was_listed_but_not_what_was_taken_meanwhile(driver: Driver, spec: DomainSpec) -> None:
    """remove() leaves a domain stamped anew after the listing (and the disk it uses); a listed one goes."""
    task = str(uuidlib.uuid4())
    driver.spawn(_by(spec, task, 0), power_on=False)
    listed = driver.objects(spec.uuid)
    driver.spawn(_by(spec, task, 1), power_on=False)  # taken by a later epoch after the listing
    assert driver.remove(spec.uuid, listed) == []
    assert {o.kind for o in driver.objects(spec.uuid)} == {"domain", "volume"}
    now = driver.objects(spec.uuid)
    assert sorted(driver.remove(spec.uuid, now)) == sorted(o.name for o in now)
    assert driver.objects(spec.uuid) == []


def test_hard_reboot_defines_a_lost_domain_anew_on_its_disk(driver: Driver, spec: DomainSpec) -> None:
    """A domain gone while its disk stayed comes back on that disk with a hard reboot (a soft one cannot)."""
    disk = driver.spawn(_by(spec, str(uuidlib.uuid4())), power_on=False)
    moved = driver.migrate_disk_and_power_off(spec.uuid, timeout=0, retry_interval=0, disk=disk)
    assert moved == disk and spec.uuid not in driver.list_instances().owned
    with pytest.raises(DomainNotFound):
        driver.reboot(dataclasses.replace(spec, disk=disk), RebootType.SOFT)
    driver.reboot(_by(dataclasses.replace(spec, disk=disk), str(uuidlib.uuid4())), RebootType.HARD)
    assert driver.get_info(spec.uuid) is P.RUNNING and _volumes(driver, spec.uuid) == {disk}
