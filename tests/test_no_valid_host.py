"""No room, and hypervisors that cannot be reached: the error the waiting caller gets says so, and which hosts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lifecycle import Engine, Flavor, NoValidHost, Settings, TaskFailed, VmState, upgrade
from lifecycle.records import Host
from tests.conftest import FLAVOR, libvirt_ready
from tests.images import fake_image


def test_a_resize_no_host_fits_raises_no_valid_host_that_is_a_task_failed(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """A resize to a flavor no host has room for raises NoValidHost, also a TaskFailed carrying the failed task."""
    uuid = new_instance()
    for host in ("h1", "h2"):
        engine.hosts.heartbeat(host)
    with pytest.raises(NoValidHost) as failed:
        engine.resize(uuid, Flavor(vcpus=2, memory_mb=64, root_gb=1, extra_specs={"capabilities:tier": "gold"}))
    assert isinstance(failed.value, TaskFailed)
    assert failed.value.task.operation == "resize" and failed.value.task.instance_uuid == uuid
    assert "ComputeCapabilitiesFilter" in failed.value.reasons["h2"]
    assert engine.get(uuid).vm_state is VmState.ACTIVE


def test_a_create_no_host_fits_is_caught_by_either_handler(engine: Engine) -> None:
    """`except TaskFailed` (the handlers written before) still catches a create that found no host."""
    with pytest.raises(TaskFailed, match="ComputeFilter: down") as failed:
        engine.create("vm", flavor=FLAVOR, image="cirros")
    assert isinstance(failed.value, NoValidHost) and failed.value.task.operation == "create"


def test_waiting_on_a_create_that_found_no_host_raises_no_valid_host_too(engine: Engine) -> None:
    """engine.wait (the 202 pattern) and a keyed replay raise the same NoValidHost-and-TaskFailed as wait=True."""
    task = engine.create("vm", flavor=FLAVOR, image="cirros", wait=False, idempotency_key="k-1")
    with pytest.raises(NoValidHost, match="ComputeFilter: down") as waited:
        engine.wait(task.id, timeout=30)
    assert isinstance(waited.value, TaskFailed) and waited.value.task.id == task.id
    with pytest.raises(NoValidHost) as replayed:
        engine.create("vm", flavor=FLAVOR, image="cirros", idempotency_key="k-1")
    assert isinstance(replayed.value, TaskFailed) and replayed.value.task.id == task.id


@pytest.mark.libvirt
def test_unreachable_hypervisors_are_named_with_libvirts_own_words(tmp_path: Path) -> None:
    """A create on hosts whose libvirtd refuses connections ends NoValidHost naming each host and libvirt's message."""
    libvirt_ready()
    from lifecycle.drivers.libvirt import LibvirtDriver

    def quick_to_give_up(host: Host) -> LibvirtDriver:  # the real driver, with a short reconnect budget
        return LibvirtDriver(host.driver_uri, host.instances_path, reconnect_seconds=0.3)

    url = f"sqlite:///{tmp_path / 'unreachable.db'}"
    upgrade(url)
    with Engine(url, driver_factory=quick_to_give_up, settings=Settings(shutdown_timeout=0)) as engine:
        for name, address in (("far-1", "127.0.0.9"), ("far-2", "127.0.0.10")):
            engine.hosts.add(name, f"qemu+tcp://{address}:1/system", str(tmp_path / name), console_address=address)
            engine.hosts.heartbeat(name)
        engine.images.add("cirros", fake_image("cirros"))
        started = time.monotonic()
        with pytest.raises(NoValidHost) as failed:
            engine.create("vm", flavor=FLAVOR, image="cirros")
        assert time.monotonic() - started < 30
    reasons = failed.value.reasons
    assert set(reasons) == {"far-1", "far-2"}
    for name, address in (("far-1", "127.0.0.9"), ("far-2", "127.0.0.10")):
        assert "a spawn there failed (DriverUnavailable" in reasons[name]
        assert f"unable to connect to server at '{address}:1'" in reasons[name]
    assert "RetryFilter" not in str(failed.value) and "already tried" not in str(failed.value)
