"""Preemption and takeover on real QEMU: calls held inside the libvirt driver while another task takes over.

The libvirt driver's ``points`` seam runs a callable at a named point inside
a call; here it blocks on an event, which holds the call in flight exactly
where a slow hypervisor would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifecycle import Engine, Flavor, Outcome, PowerState, Settings, VmState, upgrade
from lifecycle.drivers.libvirt import LibvirtDriver
from tests.conftest import QEMU_URI, qemu_ready

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SETTINGS = Settings(libvirt_domain_type="qemu", shutdown_timeout=0)


class Hold:
    """A point inside a driver call that blocks until released (and goes on by itself after 60 s)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self) -> None:
        if self.entered.is_set():
            return  # hold the first call only
        self.entered.set()
        self.released.wait(60)


@pytest.fixture
def cloud(tmp_path: Path, base_image: Path) -> Iterator[tuple[str, Path]]:
    """A migrated SQLite database and an image; every domain left by the test is destroyed after it."""
    qemu_ready()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    with Engine(url, settings=SETTINGS) as engine:
        engine.hosts.add("q1", QEMU_URI, str(tmp_path / "instances"))
        engine.images.add("base", str(base_image))
    yield url, tmp_path / "instances"
    with Engine(url, settings=SETTINGS) as engine:
        for instance in engine.list(include_deleted=True):
            engine.hosts.driver("q1").destroy(instance.uuid)


def _driver(engine: Engine) -> LibvirtDriver:
    driver = engine.hosts.driver("q1")
    assert isinstance(driver, LibvirtDriver)
    return driver


@pytest.mark.parametrize("point", ["spawn:defined", "spawn:started"])
def test_delete_while_spawn_is_in_flight_leaves_no_domain(cloud: tuple[str, Path], point: str) -> None:
    """A delete taking over a create held inside libvirt's spawn: once the spawn returns, no domain or disk is left."""
    url, instances = cloud
    with Engine(url, settings=SETTINGS) as engine:
        hold = Hold()
        _driver(engine).points[point] = hold
        build = engine.create("held", host="q1", flavor=Flavor(1, 64, 1), image="base", wait=False)
        assert hold.entered.wait(60)
        engine.delete(build.instance_uuid)
        hold.released.set()
        engine.runner.wait_idle()
        uuid = build.instance_uuid
        assert engine.task(build.id).outcome is Outcome.PREEMPTED
        assert engine.get(uuid).vm_state is VmState.DELETED and engine.store.claims.of(uuid) == []
        assert uuid not in _driver(engine).list_instances().owned
        assert not [p for p in (instances / "disks").glob(f"{uuid}*")]


def test_a_taken_over_worker_that_wakes_late_makes_no_more_calls(cloud: tuple[str, Path]) -> None:
    """A rebuild held after it removed the old disk is taken over by force; when it wakes it is fenced before its spawn."""
    url, instances = cloud
    first = Engine(url, settings=SETTINGS, owner="node-1")
    uuid = first.create("victim", host="q1", flavor=Flavor(1, 64, 1), image="base").instance_uuid
    hold = Hold()
    _driver(first).points["remove:done"] = hold
    rebuild = first.rebuild(uuid, wait=False)
    assert hold.entered.wait(60)

    second = Engine(url, settings=SETTINGS, owner="node-1")
    assert second.recover() == []  # the lease is live: not taken without force
    (taken,) = second.recover(force=True)
    assert (taken.task_id, taken.outcome) == (rebuild.id, "succeeded")
    assert second.task(rebuild.id).epoch == 1
    second.stop(uuid)
    current = second.get(uuid).disk
    assert current is not None
    disk = (instances / "disks" / current).stat().st_ino

    hold.released.set()
    first.runner.wait_idle()
    assert second.get(uuid).vm_state is VmState.STOPPED
    assert _driver(second).get_info(uuid) is PowerState.SHUTDOWN  # the old worker did not spawn it again
    assert (instances / "disks" / current).stat().st_ino == disk  # nor replace the disk the new owner made
    assert second.task(rebuild.id).outcome is Outcome.SUCCEEDED
    first.close()
    second.delete(uuid)
    second.close()
