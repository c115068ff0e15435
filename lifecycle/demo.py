"""``lifecycle demo``: the engine end to end on its embedded default, SQLite plus libvirt.

compute-1 is a libvirt host when ``--uri`` names one (``make demo`` starts a
libvirtd for it and passes ``qemu:///system``: real QEMU guests, TCG, on a
real qcow2 base made with qemu-img), else a fake host. The demo builds an
instance there, walks it through the power operations, destroys its domain
behind the engine's back so that a pause is refused by the hypervisor (the
guest is unchanged, so the vm_state stays), then lets a sync pass correct
another out-of-band shutdown. With ``--remote-uri`` (``make demo`` starts a
second libvirtd in its own mount namespace, reached over TCP), the instance
is then resized onto that host, its disk streamed over the two libvirt
connections, and the resize confirmed. compute-2 is a fake host with
scripted faults: a stop held inside the "hypervisor" is taken over by a force
delete, and a scheduled instance whose engine "crashes" mid-operation is
finished by recovery. The audit logs are printed at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lifecycle.audit import format_history
from lifecycle.config import Settings
from lifecycle.drivers.base import Driver
from lifecycle.drivers.fake import FakeDriver, SimulatedCrash
from lifecycle.engine import Engine
from lifecycle.errors import Preempted, TaskFailed
from lifecycle.graph import Op
from lifecycle.records import Flavor, Host, to_plain
from lifecycle.store import upgrade

__all__ = ["DemoHosts", "run_demo"]


@dataclass(frozen=True, slots=True)
class DemoHosts:
    """Where the demo's libvirt hosts are: none (fake hosts only), compute-1, and compute-3 on another libvirtd."""

    uri: str | None = None
    remote_uri: str | None = None
    remote_instances: str = "/var/lib/libvirt/lifecycle/demo"


def run_demo(keep: str | None = None, *, as_json: bool = False, hosts: DemoHosts | None = None) -> dict[str, Any]:
    """Run the demonstration; print as it goes (or one JSON document) and return the summary."""
    hosts = hosts or DemoHosts()
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return _demo(Path(keep), as_json, hosts)
    with tempfile.TemporaryDirectory(prefix="lifecycle-demo-") as scratch:
        Path(scratch).chmod(0o755)  # libvirtd's QEMU reads the base image here
        return _demo(Path(scratch), as_json, hosts)


def _libvirt_ready() -> str | None:
    from lifecycle.drivers.libvirt import libvirt_available

    if not libvirt_available():
        return "libvirt-python is not installed"
    if shutil.which("qemu-img") is None:
        return "qemu-img is not installed"
    return None


def _demo(workdir: Path, as_json: bool, hosts: DemoHosts) -> dict[str, Any]:
    say: Callable[..., None] = (lambda *_: None) if as_json else print
    url = f"sqlite:///{workdir / 'lifecycle.db'}"
    upgrade(url)
    fake, local = FakeDriver("compute-2"), FakeDriver("compute-1")
    missing = "no --uri given" if hosts.uri is None else _libvirt_ready()

    def driver_for(host: Host) -> Driver:
        if host.name == "compute-2" or (missing and host.name == "compute-1"):
            return fake if host.name == "compute-2" else local
        return engine.drivers.connect(host)

    summary: dict[str, Any] = {"database": url, "instances": {}}
    settings = Settings(
        shutdown_timeout=2, soft_reboot_seconds=2, libvirt_domain_type="qemu", image_store_dir=str(workdir / "images")
    )
    try:
        with Engine(url, driver_factory=driver_for, settings=settings) as engine:
            uri = hosts.uri if missing is None and hosts.uri is not None else "fake://"
            engine.hosts.add("compute-1", uri, str(workdir / "instances"), vcpus=4, memory_mb=4096, disk_gb=40)
            engine.hosts.add(
                "compute-2",
                "fake://",
                str(workdir / "instances-2"),
                vcpus=8,
                memory_mb=8192,
                disk_gb=80,
                capabilities={"tier": "gold"},
            )
            for host in ("compute-1", "compute-2"):
                engine.hosts.heartbeat(host)  # a daemon owning the host does this; the scheduler needs it
            base = workdir / "cirros.qcow2"
            if shutil.which("qemu-img") is not None:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
            else:  # the fake hosts never read it
                base.write_bytes(b"")
            engine.images.add("cirros", str(base))
            kind = f"the fake driver ({missing})" if missing else f"libvirt at {hosts.uri}, real QEMU guests"
            say(f"database: {url}\ncompute-1: {kind}; compute-2: a fake host with scripted faults\n")

            web = engine.create("web-1", host="compute-1", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
            say(f"created web-1 {web} on compute-1: {engine.get(web).status}")
            for op in (
                Op.STOP,
                Op.START,
                Op.REBOOT,
                Op.PAUSE,
                Op.UNPAUSE,
                Op.SUSPEND,
                Op.RESUME,
                Op.RESCUE,
                Op.UNRESCUE,
                Op.REBUILD,
            ):
                engine.run(op, web)
                say(f"  {op:<9} -> {engine.get(web).status}")
            engine.reboot(web, hard=True)
            say(f"  reboot --hard -> {engine.get(web).status}")
            engine.shelve(web)
            say(f"  shelve    -> {engine.get(web).status}: disk kept as image shelved-..., host {engine.get(web).host}")
            engine.unshelve(web, host="compute-1")
            say(f"  unshelve  -> {engine.get(web).status} on {engine.get(web).host}, spawned from the snapshot")

            engine.hosts.driver("compute-1").power_off(web, timeout=0, retry_interval=0)
            say("\nweb-1's domain destroyed behind the engine's back")
            try:
                engine.pause(web)
            except TaskFailed as exc:
                say(f"  pause refused by the hypervisor: {exc.error}")
                say(f"  guest unchanged, so the vm_state stays: {engine.get(web).status}")
            engine.stop(web)
            say(f"  stop -> {engine.get(web).status}")
            engine.start(web)
            engine.hosts.driver("compute-1").power_off(web, timeout=0, retry_interval=0)
            summary_line = engine.hosts.sync("compute-1")[0]
            say(f"  started, then shut down behind our back; a sync pass: rules {summary_line.rules}")
            say(f"  -> {engine.get(web).status} (the stop ran as a task with actor sync)")
            if missing is None and hosts.remote_uri is not None:
                _resize_to_remote(engine, web, hosts, say)

            db = engine.create("db-1", host="compute-2", flavor=Flavor(2, 128, 2), image="cirros").instance_uuid
            gate = fake.faults.hold("power_off")
            stopper = threading.Thread(target=_stop_quietly, args=(engine, db))
            stopper.start()
            gate.wait_entered()
            stuck = engine.get(db).task_state
            say(f"\ncreated db-1 {db} on compute-2; its stop is stuck in the hypervisor: task_state {stuck}")
            engine.force_delete(db)
            say(f"  force_delete took over: {engine.get(db).status}")
            gate.release()
            stopper.join()
            stop_task = engine.tasks(db)[1]
            say(f"  the stop task ended {stop_task.outcome.value} by {stop_task.preempted_by}; the row was left alone")

            for host in ("compute-1", "compute-2"):  # real guests take a while: beat again, as a daemon would
                engine.hosts.heartbeat(host)
            gold = Flavor(1, 256, 1, extra_specs=(("capabilities:tier", "gold"),))
            app = engine.create("app-1", flavor=gold, image="cirros").instance_uuid
            say(f"\napp-1 {app} scheduled (flavor wants capabilities:tier=gold) to {engine.get(app).host}")
            fake.faults.crash_after(Driver.pause.__name__)
            try:
                engine.pause(app)
            except SimulatedCrash:
                say(f"  the engine 'crashed' inside pause: task_state {engine.get(app).task_state}, task still running")
        with Engine(url, driver_factory=driver_for, settings=settings, owner=engine.owner) as engine:
            recovered = engine.recover(force=True)  # it knows its predecessor died: no lease wait
            done = recovered[0]
            say(f"  a restarted engine recovers it: {done.plan} -> {done.outcome}, {engine.get(app).status}")
            for name, uuid in (("web-1", web), ("db-1", db), ("app-1", app)):
                history = engine.history(uuid)
                summary["instances"][name] = {"instance": to_plain(engine.get(uuid)), "history": to_plain(history)}
                say(f"\naudit log of {name}:\n{format_history(history)}")
    finally:  # whatever happened, the demo leaves no guest and no pool on a libvirtd it may share
        with Engine(url, driver_factory=driver_for, settings=settings) as engine:
            _drop_storage(engine, {i.uuid for i in engine.list(include_deleted=True)})
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _resize_to_remote(engine: Engine, uuid: str, hosts: DemoHosts, say: Callable[..., None]) -> None:
    """Resize the guest onto compute-3, a libvirtd the engine reaches only over TCP, and confirm."""
    assert hosts.remote_uri is not None
    address = urlsplit(hosts.remote_uri).hostname  # its guests' VNC servers listen on that machine
    engine.hosts.add(
        "compute-3",
        hosts.remote_uri,
        hosts.remote_instances,
        vcpus=4,
        memory_mb=4096,
        disk_gb=40,
        console_address=address,
    )
    engine.hosts.heartbeat("compute-3")
    engine.start(uuid)
    engine.hosts.set_enabled("compute-2", False)  # a resize is scheduled: leave compute-3 the only choice
    engine.resize(uuid, Flavor(1, 96, 2))
    engine.hosts.set_enabled("compute-2", True)
    copy = engine.migrations()[0]
    say(f"\nresized web-1 onto compute-3 ({hosts.remote_uri}): {engine.get(uuid).status} on {engine.get(uuid).host}")
    say(f"  the disk was streamed between the two libvirt connections: {copy.bytes_done} bytes of data")
    engine.confirm_resize(uuid)
    say(f"  confirm_resize -> {engine.get(uuid).status}; the source's kept disk is gone")


def _drop_storage(engine: Engine, uuids: set[str]) -> None:
    """Delete the demo's guests and pools on its libvirt hosts: it leaves nothing on a shared libvirtd."""
    from lifecycle.drivers.libvirt import LibvirtDriver

    for host in engine.hosts.list():
        driver = engine.hosts.driver(host.name)
        if isinstance(driver, LibvirtDriver):
            for uuid in set(driver.list_instances().owned) & uuids:
                driver.destroy(uuid)
            driver.drop_storage()


def _stop_quietly(engine: Engine, uuid: str) -> None:
    with contextlib.suppress(Preempted):
        engine.stop(uuid)
