"""Ownership reaches the hypervisor, on real QEMU across two libvirt hosts, with a data marker in the disk.

Host ``a`` is this machine's libvirtd (its instances path under the test's
``tmp_path``, so ``qemu-io`` writes a marker straight into the instance's
qcow2 disk while the guest is off); host ``b`` is the second libvirtd. A
worker is stalled by holding a driver call at one of the libvirt driver's
``points`` (the call is in flight exactly where a slow or SIGSTOPped process
would be), a second engine under the same owner name takes the task over with
a forced recovery, and then the first is released. What must hold: the
marker survives, no volume of the current life is deleted, a stale copy is
never started, and at most one copy runs.
"""

from __future__ import annotations

import dataclasses
import subprocess
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from lifecycle import Engine, Flavor, Outcome, PowerState, Settings, VmState, upgrade
from lifecycle.drivers.base import Attempt, DomainSpec
from lifecycle.drivers.libvirt import LibvirtDriver
from lifecycle.drivers.storage import volume_digest
from lifecycle.errors import DriverError, Fenced
from lifecycle.states import MigrationStatus
from tests.conftest import QEMU_URI, RemoteHost, qemu_ready, wait_until
from tests.test_fleet_qemu import frozen
from tests.test_preemption_qemu import Hold

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SETTINGS = Settings(libvirt_domain_type="qemu", shutdown_timeout=0)
MARKER = ("0x5a", 1024 * 1024, 65536)
"""A 64 KiB pattern of 0x5a at 1 MiB into the guest's disk."""


@dataclasses.dataclass
class Pair:
    """A database with hosts a (local) and b (remote) and image ``base``."""

    url: str
    a_path: Path
    b_path: PurePosixPath
    remote: RemoteHost
    engines: list[Engine] = dataclasses.field(default_factory=list)

    def engine(self) -> Engine:
        """Open an engine on the pair under the owner name every engine here shares."""
        engine = Engine(self.url, settings=SETTINGS, owner="node-1")
        self.engines.append(engine)
        return engine

    def driver(self, engine: Engine, host: str) -> LibvirtDriver:
        driver = engine.hosts.driver(host)
        assert isinstance(driver, LibvirtDriver)
        return driver


@pytest.fixture
def pair(tmp_path: Path, base_image: Path, remote_host: RemoteHost, remote_instances: PurePosixPath) -> Iterator[Pair]:
    """Hosts a and b with heartbeats and image base; every engine is closed and every instance destroyed after."""
    qemu_ready()
    tmp_path.chmod(0o755)  # QEMU reads the base image through the instances path under it
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    pair = Pair(url, tmp_path / "a", remote_instances, remote_host)
    setup = pair.engine()
    setup.hosts.add("a", QEMU_URI, str(pair.a_path), vcpus=8, memory_mb=4096, disk_gb=50)
    setup.hosts.add(
        "b", remote_host.uri, str(remote_instances), vcpus=8, memory_mb=4096, disk_gb=50, console_address="127.0.0.2"
    )
    for name in ("a", "b"):
        setup.hosts.heartbeat(name)
    setup.images.add("base", str(base_image))
    yield pair
    for engine in pair.engines:
        engine.runner.wait_idle()
    for instance in setup.list(include_deleted=True):
        for host in ("a", "b"):
            pair.driver(setup, host).destroy(instance.uuid)
    for engine in pair.engines:
        engine.close()


def _qemu_io(path: Path, command: str) -> str:
    done = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "failed" not in done.stdout.lower(), done.stdout + done.stderr
    return done.stdout


def _marked_stopped_vm(pair: Pair, engine: Engine, size: str | None = None) -> str:
    """Create an instance on a, stop it and write the marker (and ``size`` more bytes) into its disk."""
    uuid = engine.create("marked", host="a", flavor=Flavor(1, 64, 2), image="base").instance_uuid
    engine.stop(uuid)
    disk = engine.get(uuid).disk
    assert disk is not None
    pattern, offset, length = MARKER
    if size is not None:
        _qemu_io(pair.a_path / "disks" / disk, f"write -P 0x33 8M {size}")
    _qemu_io(pair.a_path / "disks" / disk, f"write -P {pattern} {offset} {length}")
    return uuid


def _digest(driver: LibvirtDriver, disk: str) -> str:
    """The sha256 of a root volume's content as the host holds it."""
    with driver._calling("test") as conn:
        vol = driver.storage.volume(conn, driver.storage.disks_pool, disk)
        assert vol is not None, disk
        return volume_digest(conn, vol).hexdigest()


def _marker_on_a(pair: Pair, disk: str) -> None:
    pattern, offset, length = MARKER
    _qemu_io(pair.a_path / "disks" / disk, f"read -P {pattern} {offset} {length}")


def _volumes(driver: LibvirtDriver, uuid: str) -> dict[str, Any]:
    """The instance's volumes on a host, by name, with their paths."""
    return {o.name: o for o in driver.objects(uuid) if o.kind == "volume"}


def _domain_disk(driver: LibvirtDriver, uuid: str) -> str | None:
    domains = [o for o in driver.objects(uuid) if o.kind == "domain"]
    return None if not domains else domains[0].volumes[0]


def _back_to_a(engine: Engine, pair: Pair, uuid: str) -> None:
    """Move the instance home to a, confirm, and check the marker there (the data survived every step)."""
    engine.migrate(uuid, host="a")
    engine.confirm_resize(uuid)
    disk = engine.get(uuid).disk
    assert disk is not None and engine.get(uuid).host == "a"
    _marker_on_a(pair, disk)


def test_a_stalled_copy_never_deletes_the_disk_its_recovery_made(pair: Pair) -> None:
    """A migrate held mid-copy and finished by a forced recovery: the stale worker wakes, deletes only its own copy."""
    first = pair.engine()
    uuid = _marked_stopped_vm(pair, first)
    hold = Hold()
    pair.driver(first, "b").points["receive:created"] = hold
    task = first.migrate(uuid, host="b", wait=False)
    assert hold.entered.wait(60)
    second = pair.engine()
    [recovered] = second.recover(force=True)
    assert (recovered.task_id, recovered.outcome) == (task.id, "succeeded")
    current = second.get(uuid).disk
    assert current is not None and current.endswith("-1") and second.get(uuid).host == "b"
    hold.released.set()
    first.runner.wait_idle()
    assert first.task(task.id).epoch == 1 and second.task(task.id).outcome is Outcome.SUCCEEDED
    b = pair.driver(second, "b")
    assert list(_volumes(b, uuid)) == [current] and _domain_disk(b, uuid) == current  # the stale copy went alone
    second.confirm_resize(uuid)
    _back_to_a(second, pair, uuid)


def test_a_stale_copy_on_the_destination_is_destroyed_never_started(pair: Pair) -> None:
    """A domain and disk of an earlier life on b are destroyed (audited) before the move copies the current disk."""
    engine = pair.engine()
    uuid = _marked_stopped_vm(pair, engine)
    b = pair.driver(engine, "b")
    instance, image = engine.get(uuid), engine.store.images.get("base")
    stale = DomainSpec(uuid, "marked", 1, 64, 1, image.path, "qcow2", attempt=Attempt(str(uuidlib.uuid4()), 0))
    stale_disk = b.spawn(stale, power_on=True)  # an evacuated copy left on a host that was fenced but alive
    engine.migrate(uuid, host="b")
    i = engine.get(uuid)
    assert (i.host, i.status) == ("b", "VERIFY_RESIZE") and i.disk is not None
    assert stale_disk not in _volumes(b, uuid) and _domain_disk(b, uuid) == i.disk
    assert b.get_info(uuid) is PowerState.SHUTDOWN  # moved stopped, as it was: the stale running copy is gone
    notes = [e.message or "" for e in engine.history(uuid) if "never adopted nor started" in (e.message or "")]
    assert len(notes) == 1 and stale_disk in notes[0] and instance.vm_state is VmState.STOPPED
    engine.confirm_resize(uuid)
    _back_to_a(engine, pair, uuid)


def test_a_stalled_resize_never_kills_the_guest_its_recovery_rolled_back(pair: Pair) -> None:
    """A migrate held before the source stopped its guest, rolled back by a forced recovery, leaves the guest running."""
    first = pair.engine()
    uuid = first.create("victim", host="a", flavor=Flavor(1, 64, 1), image="base").instance_uuid
    hold = Hold()
    pair.driver(first, "a").points["migrate:begin"] = hold
    task = first.migrate(uuid, host="b", wait=False)
    assert hold.entered.wait(60)
    second = pair.engine()
    [recovered] = second.recover(force=True)
    assert (recovered.task_id, recovered.plan) == (task.id, "roll_back")
    hold.released.set()
    first.runner.wait_idle()
    i = second.get(uuid)
    a = pair.driver(second, "a")
    assert (i.host, i.vm_state) == ("a", VmState.ACTIVE) and a.get_info(uuid) is PowerState.RUNNING
    assert _domain_disk(a, uuid) == i.disk and not pair.driver(second, "b").objects(uuid)
    with pytest.raises(Fenced):  # what the stale worker met: the domain names the recovery's epoch
        a.migrate_disk_and_power_off(uuid, timeout=0, retry_interval=0, attempt=Attempt(task.id, 0))


def test_a_delete_racing_a_build_always_ends_deleted(pair: Pair) -> None:
    """A delete started the moment a build runs (five times) ends deleted, with no domain or volume left on a."""
    engine = pair.engine()
    a = pair.driver(engine, "a")
    for n in range(5):
        build = engine.create(f"raced-{n}", host="a", flavor=Flavor(1, 64, 1), image="base", wait=False)
        engine.delete(build.instance_uuid)
        engine.runner.wait_idle()
        i = engine.get(build.instance_uuid)
        assert i.vm_state is VmState.DELETED, (n, engine.task(build.id).error)
        assert a.objects(build.instance_uuid) == [], n


def test_a_move_that_fails_after_the_copy_is_reverted_from_error_with_its_data(pair: Pair) -> None:
    """A destination that cannot start the copied guest leaves error with the move open; revert brings it home whole."""
    engine = pair.engine()
    uuid = _marked_stopped_vm(pair, engine)
    engine.start(uuid)
    kept = engine.get(uuid).disk
    assert kept is not None

    def cannot_start() -> None:
        raise DriverError("injected: the destination cannot start the guest", call="finish_migration")

    pair.driver(engine, "b").points["arrive:defined"] = cannot_start
    with pytest.raises(Exception, match="cannot start the guest"):
        engine.migrate(uuid, host="b")
    i = engine.get(uuid)
    migration = engine.store.moves.open_of(uuid)
    assert (i.vm_state, i.host) == (VmState.ERROR, "b") and migration is not None
    pair.driver(engine, "b").points.clear()
    engine.revert_resize(uuid)
    i = engine.get(uuid)
    assert (i.vm_state, i.host, i.disk) == (VmState.ACTIVE, "a", kept)
    assert not pair.driver(engine, "b").objects(uuid)  # the copy on b went
    assert engine.store.moves.get(migration.id).status is MigrationStatus.ERROR  # it never finished
    engine.stop(uuid)
    _marker_on_a(pair, kept)


def test_a_source_lost_mid_copy_leaves_the_move_open_until_it_answers(pair: Pair) -> None:
    """b stops answering while its disk is read: the instance stays on b in error, disk kept; revert then restores it."""
    engine = pair.engine()
    uuid = _marked_stopped_vm(pair, engine, size="512M")
    engine.migrate(uuid, host="b")
    engine.confirm_resize(uuid)
    b = pair.driver(engine, "b")
    disk = engine.get(uuid).disk
    assert disk is not None and engine.get(uuid).host == "b"
    before = _digest(b, disk)
    task = engine.migrate(uuid, host="a", wait=False)
    wait_until(
        "the copy to start",
        lambda: any(s.name == "resize_finish" and s.bytes_done for s in engine.steps(task.id)),
        12,
        interval=0.02,
    )
    with frozen(pair.remote):
        engine.runner.wait_idle()  # keepalive ends the copy; the roll-back cannot reach b
    i = engine.get(uuid)
    assert (i.vm_state, i.host, i.disk) == (VmState.ERROR, "b", disk), engine.task(task.id).error
    assert engine.store.moves.open_of(uuid) is not None
    assert not [o for o in pair.driver(engine, "a").objects(uuid) if o.kind == "domain"]
    engine.revert_resize(uuid)
    i = engine.get(uuid)
    assert (i.vm_state, i.host, i.disk) == (VmState.STOPPED, "b", disk)
    assert _digest(b, disk) == before and not pair.driver(engine, "a").objects(uuid)
