"""Sync against real QEMU under libvirtd: out-of-band changes made with virsh."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifecycle import Engine, Flavor, PowerState, Settings, VmState, upgrade
from lifecycle.events import EventProcessor
from lifecycle.sweep import sweep_host
from lifecycle.sync import Policy, Stance
from tests.conftest import QEMU_URI, qemu_ready, wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
P, V = PowerState, VmState


def virsh(*args: str) -> None:
    """Change the hypervisor behind the engine's back."""
    subprocess.run(["virsh", "-q", "-c", QEMU_URI, *args], check=True, capture_output=True)


@pytest.fixture
def engine(tmp_path: Path, base_image: Path) -> Iterator[Engine]:
    """An engine with host q1 on the real libvirtd; its instances are force-deleted afterwards."""
    qemu_ready()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    settings = Settings(
        libvirt_domain_type="qemu",
        shutdown_timeout=0,
        soft_reboot_seconds=1,
        stopped_event_delay=1.0,
        sync_interval=600,
    )
    eng = Engine(url, settings=settings)
    eng.hosts.add("q1", QEMU_URI, str(tmp_path / "instances"))
    eng.images.add("base", str(base_image))
    try:
        yield eng
        for instance in eng.list():
            eng.force_delete(instance.uuid)
    finally:
        eng.close()


def _create(engine: Engine) -> str:
    return engine.create("guest", host="q1", flavor=Flavor(1, 64, 1), image="base").instance_uuid


def _sync(engine: Engine, policy: Policy | None = None):  # type: ignore[no-untyped-def]
    return sweep_host(engine.services, "q1", policy or Policy())


def test_virsh_destroy_becomes_stopped_through_the_event_path(engine: Engine) -> None:
    """An active guest destroyed with virsh ends stopped via its STOPPED event, no periodic pass needed."""
    uuid = _create(engine)
    processor = EventProcessor(engine.services, "q1", Policy(), delay=0.5)
    stop = threading.Event()
    worker = threading.Thread(target=processor.run, args=(stop,))
    worker.start()
    engine.hosts.driver("q1").register_event_listener(processor.on_event)
    try:
        virsh("destroy", f"lifecycle-{uuid}")
        wait_until("the instance recorded stopped", lambda: engine.get(uuid).vm_state is V.STOPPED, 30)
    finally:
        engine.hosts.driver("q1").register_event_listener(None)
        stop.set()
        processor.wake()
        worker.join(10)
    rows = [r for r in engine.history(uuid) if r.cause == "event"]
    assert rows and {r.rule for r in rows} == {"active_but_off:adopt"}


@pytest.mark.parametrize(
    ("policy", "vm_state", "guest"),
    [(Policy(), V.STOPPED, P.SHUTDOWN), (Policy(stopped_but_running=Stance.ADOPT), V.ACTIVE, P.RUNNING)],
)
def test_virsh_start_of_a_stopped_instance(
    engine: Engine, policy: Policy, vm_state: VmState, guest: PowerState
) -> None:
    """A stopped instance started with virsh is powered off again by default, or adopted as active."""
    uuid = _create(engine)
    engine.stop(uuid)
    virsh("start", f"lifecycle-{uuid}")
    _sync(engine, policy)
    assert (engine.get(uuid).vm_state, engine.hosts.driver("q1").get_info(uuid)) == (vm_state, guest)


def test_paused_then_destroyed_guest_is_force_stopped(engine: Engine) -> None:
    """A paused instance whose guest is destroyed out of band ends stopped (force_stop)."""
    uuid = _create(engine)
    engine.pause(uuid)
    virsh("destroy", f"lifecycle-{uuid}")
    summary = _sync(engine)
    assert summary.rules == {"paused_but_off:adopt": 1}
    assert (engine.get(uuid).vm_state, engine.get(uuid).power_state) == (V.STOPPED, P.SHUTDOWN)


def test_undefined_domain_is_marked_only_after_three_passes(engine: Engine) -> None:
    """A domain destroyed and undefined with virsh is left alone for two passes, then marked error."""
    uuid = _create(engine)
    virsh("destroy", f"lifecycle-{uuid}")
    virsh("undefine", f"lifecycle-{uuid}")
    for _ in range(2):
        _sync(engine)
        assert engine.get(uuid).vm_state is V.ACTIVE
    _sync(engine)
    assert (engine.get(uuid).vm_state, engine.get(uuid).power_state) == (V.ERROR, P.NOSTATE)


def test_reboot_racing_a_sync_pass_ends_in_the_reboots_result(engine: Engine) -> None:
    """A sync pass during a hard reboot skips the instance; the reboot's active/running stands."""
    uuid = _create(engine)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (engine.reboot(uuid, hard=True), done.set()))
    worker.start()
    wait_until(
        "the task started, or already done", lambda: engine.get(uuid).task_state is not None or done.is_set(), 30
    )
    summary = _sync(engine)
    worker.join(60)
    assert done.is_set()
    assert summary.skipped + summary.in_sync == 1 and summary.acted == 0
    i = engine.get(uuid)
    assert (i.vm_state, i.task_state, i.power_state) == (V.ACTIVE, None, P.RUNNING)
    assert (engine.tasks(uuid)[-1].operation, engine.tasks(uuid)[-1].outcome.value) == ("reboot_hard", "succeeded")


def test_the_daemon_handles_virsh_changes_while_it_runs(engine: Engine) -> None:
    """With the daemon running, a virsh destroy of an active guest and a virsh start of a stopped one are corrected."""
    from lifecycle.daemon import Daemon

    active, stopped = _create(engine), _create(engine)
    engine.stop(stopped)
    daemon = Daemon(engine, claim_interval=0.2)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_until("q1 claimed by the daemon", lambda: "q1" in daemon.claims, 30)
        virsh("destroy", f"lifecycle-{active}")
        virsh("start", f"lifecycle-{stopped}")
        wait_until(
            "the instance stopped through the event path", lambda: engine.get(active).vm_state is V.STOPPED, 30
        )  # the event path, delay 15 s by default
        wait_until("the guest shut down on q1", lambda: engine.hosts.driver("q1").get_info(stopped) is P.SHUTDOWN, 30)
    finally:
        daemon.stop.set()
        thread.join(30)
    assert engine.hosts.get("q1").last_heartbeat is not None
