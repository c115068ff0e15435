"""Two real libvirt hosts driven through the ``lifecycle`` command line, as an operator drives them.

Host ``a`` is ``qemu:///system`` with its instances path in the test's ``tmp_path``; host ``b`` is
the second libvirtd (``remote_host``), reached only as ``qemu+tcp://...`` with an instances path
that exists on that host alone. What the hypervisors hold is read back through libvirt: domain
states, the volumes of the ``lifecycle-*-disks`` and ``-cache`` pools, a disk's content (a sparse
volume download, sha256'd).

Every command runs the installed ``lifecycle`` executable, configured as an operator configures
it: a config file (``LIFECYCLE_CONFIG``) with the database and the settings these guests need
(domain type ``qemu``: TCG; no ACPI in them, so ``shutdown_timeout`` 0 and a short
``soft_reboot_seconds``), and ``LIFECYCLE_...`` variables for what one test changes
(``host_down_after``). The one exception is a command that must start
the moment a copy is under way: it runs the CLI's ``main`` in a process that has loaded
everything and waits on its stdin. The set-up, ``show``, ``host list`` and the polls during a
disk copy run ``main`` in this process, to read without an interpreter start-up (about a second
here) between two reads. What must happen once some time has passed (the resize confirm
window, a host down after ``host_down_after``) runs on an engine in this process
(:meth:`Fleet.engine`) whose clock the test advances, instead of waiting for the time to pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from lifecycle import Engine, Settings, VmState
from lifecycle.cli import main
from lifecycle.clock import ManualClock
from lifecycle.daemon import Daemon
from tests.conftest import QEMU_URI, RemoteHost, library_logging_kept, qemu_ready, wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

EXECUTABLE = [str(Path(sys.executable).with_name("lifecycle"))]
if not Path(EXECUTABLE[0]).exists():
    EXECUTABLE = [sys.executable, "-m", "lifecycle.cli"]
CONFIG = 'libvirt_domain_type = "qemu"\nshutdown_timeout = 0\nsoft_reboot_seconds = 1\n'
"""The settings of every command (with the database URL): TCG guests, which have no ACPI to shut down by."""
SETTINGS = {"libvirt_domain_type": "qemu", "shutdown_timeout": 0.0, "soft_reboot_seconds": 1.0}
"""The same settings, for an engine in this process (:meth:`Fleet.engine`)."""
BIG = "1G"
"""Data written into a disk whose copy a test interrupts (about 2-3 s of copy here)."""
GATED = "import sys, libvirt, lifecycle.cli; sys.stdin.readline(); sys.exit(lifecycle.cli.main(sys.argv[1:]))"
"""A CLI process that loads everything, then waits for a line on stdin before it runs its command."""


# -- what a libvirt host holds ---------------------------------------------------------------


@dataclass(frozen=True)
class HostView:
    """A libvirt host seen from outside the engine: its domains and its pools' volumes."""

    uri: str
    instances: PurePosixPath

    @contextlib.contextmanager
    def conn(self) -> Iterator[Any]:
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            yield conn
        finally:
            conn.close()

    def _pool(self, conn: Any, sub: str) -> Any | None:
        """The engine's pool whose folder is ``<instances>/<sub>`` (None when the engine made none)."""
        for pool in conn.listAllStoragePools(0):
            target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
            if pool.name().startswith("lifecycle-") and target and PurePosixPath(target) == self.instances / sub:
                return pool
        return None

    def volumes(self, sub: str = "disks") -> set[str]:
        """Names of the volumes in the disks (or ``_base``: cache) pool, as the host has them now."""
        with self.conn() as conn:
            pool = self._pool(conn, sub)
            if pool is None or not pool.isActive():
                return set()
            pool.refresh(0)
            names = [vol.name() for vol in pool.listAllVolumes(0)]
        if sub != "disks":
            return set(names)
        # An instance's root volume is named <uuid>.<attempt tag>: one per instance, counted by its uuid.
        owners = [n if n.endswith(".rescue") else n.split(".", 1)[0] for n in names]
        assert len(owners) == len(set(owners)), f"more than one root volume of an instance: {names}"
        return set(owners)

    def _volume(self, conn: Any, name: str) -> Any:
        pool = self._pool(conn, "disks")
        assert pool is not None, f"no disks pool for {self.instances} on {self.uri}"
        pool.refresh(0)
        # An instance's uuid names its one root volume, whatever attempt tag that carries.
        found = [v for v in pool.listAllVolumes(0) if v.name() == name or v.name().startswith(name + ".")]
        found = [v for v in found if not v.name().endswith(".rescue")] or found
        assert len(found) == 1, f"{name}: volumes {[v.name() for v in found]}"
        return found[0]

    def capacity(self, name: str) -> int:
        """A disk volume's virtual size in bytes."""
        with self.conn() as conn:
            return int(self._volume(conn, name).info()[1])

    def backing(self, name: str) -> str:
        """A disk volume's backing store path."""
        with self.conn() as conn:
            return str(ET.fromstring(self._volume(conn, name).XMLDesc(0)).findtext("backingStore/path"))

    def digest(self, name: str) -> str:
        """The sha256 of a disk volume's bytes, downloaded as a sparse stream (holes read as zeros)."""
        import libvirt

        digest = hashlib.sha256()
        zeros = bytes(1 << 20)

        def data(_stream: Any, buf: bytes, _opaque: None) -> int:
            digest.update(buf)
            return len(buf)

        def hole(_stream: Any, length: int, _opaque: None) -> int:
            while length > 0:
                step = min(length, len(zeros))
                digest.update(zeros[:step])
                length -= step
            return 0

        with self.conn() as conn:
            vol = self._volume(conn, name)
            stream = conn.newStream(0)
            vol.download(stream, 0, 0, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
            stream.sparseRecvAll(data, hole, None)
            stream.finish()
        return digest.hexdigest()

    def domain(self, uuid: str) -> dict[str, Any] | None:
        """The domain of an instance: its state, id, managed save and disk files; None when there is none."""
        import libvirt

        with self.conn() as conn:
            try:
                dom = conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            root = ET.fromstring(dom.XMLDesc(0))
            return {
                "state": dom.state()[0],
                "id": dom.ID(),
                "managed_save": bool(dom.hasManagedSaveImage(0)),
                "disks": [s.get("file", "") for s in root.iterfind("devices/disk/source")],
                "type": root.get("type"),
            }

    def state(self, uuid: str) -> int | None:
        """The libvirt state of an instance's domain (None when there is no domain)."""
        dom = self.domain(uuid)
        return None if dom is None else int(dom["state"])


RUNNING, PAUSED, SHUTOFF = 1, 3, 5  # VIR_DOMAIN_RUNNING, VIR_DOMAIN_PAUSED, VIR_DOMAIN_SHUTOFF


# -- the operator's fleet ------------------------------------------------------------------


@dataclass
class Fleet:
    """A database with hosts a and b and image ``base``, and the ways to run the CLI on it."""

    tmp_path: Path
    a: HostView
    b: HostView
    remote: RemoteHost
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.tmp_path / "lifecycle.toml"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.tmp_path / 'db.sqlite'}"

    def env(self, settings: dict[str, Any] | None = None) -> dict[str, str]:
        """The environment of a command: the config file, and ``settings`` as LIFECYCLE_<KEY> variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}  # none of the caller's
        env["LIFECYCLE_CONFIG"] = str(self.config)
        env |= {f"LIFECYCLE_{key.upper()}": str(value) for key, value in (settings or {}).items()}
        return env

    def run(
        self, *args: str, settings: dict[str, Any] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run one command to its end (killed after ``timeout``: TimeoutExpired)."""
        return subprocess.run(
            [*EXECUTABLE, *args],
            env=self.env(settings),
            cwd=self.tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, settings: dict[str, Any] | None = None) -> Any:
        """Run a command with --json; it must succeed; return its output."""
        done = self.run(*args, "--json", settings=settings)
        assert done.returncode == 0, f"lifecycle {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
        return json.loads(done.stdout)

    def start(
        self, *args: str, settings: dict[str, Any] | None = None, gate: bool = False, log: Path | None = None
    ) -> subprocess.Popen[str]:
        """Start a command in the background, its stderr into ``log`` (killed at teardown if still running)."""
        with contextlib.ExitStack() as stack:
            sink = subprocess.DEVNULL if log is None else stack.enter_context(log.open("w"))
            proc = subprocess.Popen(
                [sys.executable, "-c", GATED, *args] if gate else [*EXECUTABLE, *args],
                env=self.env(settings),
                cwd=self.tmp_path,
                stdin=subprocess.PIPE if gate else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=sink,
                text=True,
            )
        self.procs.append(proc)
        return proc

    def here(self, *args: str) -> Any:
        """Run a command with --json through the CLI's ``main`` in this process; it must succeed; return its output."""
        out = io.StringIO()
        with library_logging_kept(), contextlib.redirect_stdout(out):  # the CLI configures logging globally
            code = main(["--db", self.url, "--config", str(self.config), *args, "--json"])
        assert code == 0, f"lifecycle {' '.join(args)}: exit {code}"
        return json.loads(out.getvalue())

    def create(self, name: str, host: str | None, disk: int = 1, **settings: Any) -> str:
        """Build an instance (on ``host``, or where the scheduler puts it); return its uuid."""
        where = () if host is None else ("--host", host)
        out = self.ok(
            "create", name, *where, "--flavor", f"vcpus=1,ram=64,disk={disk}", "--image", "base", settings=settings
        )
        assert out["status"] == "ACTIVE", out
        return str(out["uuid"])

    def show(self, uuid: str) -> dict[str, Any]:
        return dict(self.here("show", uuid))

    def copy_step(self, uuid: str, operation: str = "migrate") -> dict[str, Any] | None:
        """The move's resize_finish step once it has copied some bytes, else None."""
        for task in self.here("tasks", uuid):
            for step in task["steps"] if task["operation"] == operation else ():
                if step["name"] == "resize_finish" and (step["bytes_done"] or 0) > 0:
                    return dict(step)
        return None

    def big_stopped(self, name: str) -> str:
        """An instance on a, stopped, whose disk holds BIG bytes of data (its copy takes seconds)."""
        uuid = self.create(name, "a", disk=2)
        assert self.ok("stop", uuid, "--timeout", "0")["status"] == "SHUTOFF"
        disk = Path(self.a.instances) / "disks" / self.here("show", uuid)["disk"]
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {BIG}", str(disk)], check=True, capture_output=True
        )
        return uuid

    def engine(self, clock: ManualClock, **settings: Any) -> Engine:
        """An engine in this process over the fleet's database, on ``clock``, with the commands' settings and ``settings``."""
        return Engine(self.url, settings=Settings(**(SETTINGS | settings)), clock=clock)

    def heartbeat(self, *hosts: str) -> None:
        for host in hosts:
            self.here("host", "heartbeat", host)

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {h["name"]: h for h in self.here("host", "list")}


@pytest.fixture
def fleet(
    tmp_path: Path, base_image: Path, remote_host: RemoteHost, remote_instances: PurePosixPath
) -> Iterator[Fleet]:
    """Hosts a (this machine's libvirtd) and b (the remote one) and image ``base``, added with the CLI."""
    qemu_ready()
    tmp_path.chmod(0o755)  # QEMU reads the base image through the instances path under it
    fleet = Fleet(
        tmp_path=tmp_path,
        a=HostView(QEMU_URI, PurePosixPath(tmp_path / "a")),
        b=HostView(remote_host.uri, remote_instances),
        remote=remote_host,
    )
    fleet.config.write_text(f'database_url = "{fleet.url}"\n{CONFIG}')
    # Set up with the CLI's main in this process (the same commands, without six interpreter start-ups).
    fleet.here("db", "upgrade")
    hosts = {  # b has more free RAM than a: the scheduler prefers it while it is up
        "a": [QEMU_URI, str(fleet.a.instances), "2048"],
        "b": [remote_host.uri, str(remote_instances), "8192", "--console-address", "127.0.0.2"],
    }
    for name, (uri, path, ram, *more) in hosts.items():
        resources = ["--memory-mb", ram, "--vcpus", "8", "--disk-gb", "50", *more]
        fleet.here("host", "add", name, "--uri", uri, "--instances-path", path, *resources)
    fleet.heartbeat("a", "b")
    fleet.here("image", "add", "base", "--path", str(base_image))
    yield fleet
    for proc in fleet.procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@contextlib.contextmanager
def frozen(remote: RemoteHost) -> Iterator[int]:
    """SIGSTOP the remote libvirtd (by its pidfile) for the block; SIGCONT it whatever happens."""
    pid = int(remote.pidfile.read_text().strip())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def stop_daemon(proc: subprocess.Popen[str]) -> None:
    """SIGTERM a daemon and wait for it (SIGKILL if it does not end)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def log_events(log: Path) -> list[dict[str, Any]]:
    """The JSON log lines a daemon wrote so far."""
    lines = log.read_text().splitlines() if log.exists() else []
    events = []
    for line in lines:
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def stamp(text: str) -> datetime:
    """A time the CLI printed."""
    return datetime.fromisoformat(text)


# -- the tests -------------------------------------------------------------------------------


def test_every_power_operation_and_rebuild_on_the_remote_host(fleet: Fleet, tmp_path: Path) -> None:
    """An instance built on the remote host goes through every power operation and a rebuild there, and libvirt on that host agrees at each step."""
    other = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "32M"], check=True)
    fleet.ok("image", "add", "other", "--path", str(other))
    uuid = fleet.create("far", "b")
    b = fleet.b
    dom = b.domain(uuid)
    assert dom is not None and (dom["state"], dom["type"]) == (RUNNING, "qemu")
    assert fleet.a.domain(uuid) is None
    assert b.volumes() == {uuid}

    def step(*args: str, status: str, power: int, state: int) -> dict[str, Any]:
        out = fleet.ok(*args)
        assert (out["host"], out["status"], out["power_state"], out["task_state"]) == ("b", status, power, None), args
        assert fleet.show(uuid)["status"] == status
        dom = b.domain(uuid)
        assert dom is not None and dom["state"] == state, (args, dom)
        return dom

    step("stop", uuid, "--timeout", "0", status="SHUTOFF", power=4, state=SHUTOFF)
    booted = step("start", uuid, status="ACTIVE", power=1, state=RUNNING)
    rebooted = step("reboot", uuid, status="ACTIVE", power=1, state=RUNNING)
    assert rebooted["id"] != booted["id"]  # no ACPI in the guest: the soft reboot ended in a reset
    reset = step("reboot", uuid, "--hard", status="ACTIVE", power=1, state=RUNNING)
    assert reset["id"] != rebooted["id"]
    step("pause", uuid, status="PAUSED", power=3, state=PAUSED)
    step("unpause", uuid, status="ACTIVE", power=1, state=RUNNING)
    saved = step("suspend", uuid, status="SUSPENDED", power=4, state=SHUTOFF)  # saved, off: shutdown as in Nova
    assert saved["managed_save"]
    resumed = step("resume", uuid, status="ACTIVE", power=1, state=RUNNING)
    assert not resumed["managed_save"]
    rescued = step("rescue", uuid, status="RESCUE", power=1, state=RUNNING)
    assert b.volumes() == {uuid, f"{uuid}.rescue"}
    root = fleet.show(uuid)["disk"]  # the root volume, named after the attempt that made it
    assert root.startswith(f"{uuid}.")
    assert [PurePosixPath(d).name for d in rescued["disks"]] == [f"{uuid}.rescue", root]
    unrescued = step("unrescue", uuid, status="ACTIVE", power=1, state=RUNNING)
    assert [PurePosixPath(d).name for d in unrescued["disks"]] == [root]
    assert b.volumes() == {uuid}
    assert PurePosixPath(b.backing(uuid)).parent.name == "_base"
    old_backing = b.backing(uuid)
    step("rebuild", uuid, "--image", "other", status="ACTIVE", power=1, state=RUNNING)
    assert b.backing(uuid) != old_backing  # a fresh disk on the other image, cached on b
    assert len(b.volumes("_base")) == 2
    assert fleet.ok("delete", uuid)["status"] == "DELETED"
    assert b.domain(uuid) is None
    assert b.volumes() == set()


def test_resize_onto_the_remote_host_then_migrate_back_and_revert(fleet: Fleet) -> None:
    """A resize a -> b grows the disk on b and confirm empties a; a migrate b -> a copies the disk faithfully and revert brings b's own disk back unchanged, leaving a empty."""
    a, b = fleet.a, fleet.b
    uuid = fleet.create("mover", "a")
    assert fleet.ok("stop", uuid, "--timeout", "0")["status"] == "SHUTOFF"
    disk = Path(a.instances) / "disks" / fleet.here("show", uuid)["disk"]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", str(disk)], check=True, capture_output=True)
    fleet.heartbeat("b")  # up for the scheduler, which picks the destination of a resize

    out = fleet.ok("resize", uuid, "--flavor", "vcpus=1,ram=96,disk=2")
    assert (out["host"], out["status"], out["flavor"]["root_gb"]) == ("b", "VERIFY_RESIZE", 2)
    assert b.capacity(uuid) == 2 * 1024**3  # grown on b
    assert (b.state(uuid), a.state(uuid)) == (SHUTOFF, None)  # it was stopped: defined on b, not started
    assert a.volumes() == {uuid}  # the source keeps its disk until confirm
    (move,) = fleet.ok("migration", "list", "--host", "b")
    assert (move["status"], move["source_host"], move["dest_host"]) == ("finished", "a", "b")
    assert move["bytes_done"] == move["bytes_total"] > 8 * 1024**2
    out = fleet.ok("confirm-resize", uuid)
    assert (out["host"], out["status"]) == ("b", "SHUTOFF")
    assert (a.volumes(), b.volumes()) == (set(), {uuid})

    before = b.digest(uuid)
    out = fleet.ok("migrate", uuid, "--host", "a")
    assert (out["host"], out["status"]) == ("a", "VERIFY_RESIZE")
    assert (a.state(uuid), b.state(uuid)) == (SHUTOFF, None)
    assert a.digest(uuid) == before  # the copy is the disk, byte for byte (same flavor: not grown)
    disk = Path(a.instances) / "disks" / fleet.show(uuid)["disk"]  # a new volume on a, of the move's attempt
    subprocess.run(  # and the guest sees the data written on a before the first move
        ["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5a 0 8M", str(disk)], check=True, capture_output=True
    )
    assert b.volumes() == {uuid}  # kept on b until confirm or revert
    out = fleet.ok("revert-resize", uuid)
    assert (out["host"], out["status"], out["flavor"]["root_gb"]) == ("b", "SHUTOFF", 2)
    assert (a.state(uuid), b.state(uuid)) == (None, SHUTOFF)
    assert (a.volumes(), b.volumes()) == (set(), {uuid})
    assert b.digest(uuid) == before
    assert [m["status"] for m in fleet.ok("migration", "list")] == ["reverted", "confirmed"]
    assert fleet.ok("delete", uuid)["status"] == "DELETED"
    assert (b.state(uuid), b.volumes()) == (None, set())


def test_the_daemon_confirms_a_finished_move_once_the_window_has_passed(fleet: Fleet) -> None:
    """With resize_confirm_window set, a daemon leaves a move a -> b nobody confirmed until the window has passed on its clock, then confirms it: a's kept disk goes, the guest runs on b."""
    uuid = fleet.create("waiter", "a")
    out = fleet.ok("migrate", uuid, "--host", "b")
    assert (out["host"], out["status"]) == ("b", "VERIFY_RESIZE")
    assert fleet.a.volumes() == {uuid}
    (move,) = fleet.ok("migration", "list")
    clock = ManualClock(datetime.now(UTC))  # the move finished a moment before
    with fleet.engine(clock, resize_confirm_window=60.0) as engine:
        daemon = Daemon(engine, claim_interval=3600.0)
        thread = threading.Thread(target=daemon.run, name="daemon")
        thread.start()
        try:
            # The daemon applies the window at its start (too early), then every 60 s of its clock.
            wait_until("both hosts claimed and every timer asleep", lambda: clock.waiting == 5, 120, interval=0.2)
            assert fleet.show(uuid)["status"] == "VERIFY_RESIZE"
            clock.advance(60)
            wait_until("the window's confirm", lambda: fleet.show(uuid)["status"] == "ACTIVE", 60, interval=0.2)
        finally:
            daemon.stop.set()
            thread.join(60)
        assert not thread.is_alive()
    out = fleet.show(uuid)
    assert (out["host"], out["vm_state"], out["task_state"]) == ("b", "active", None)
    assert fleet.ok("migration", "show", move["id"])["status"] == "confirmed"
    (confirm,) = [t for t in fleet.ok("tasks", uuid) if t["operation"] == "confirm_resize"]
    assert (confirm["actor"], confirm["cause"], confirm["outcome"]) == ("resize_window", "timer", "succeeded")
    assert (fleet.a.volumes(), fleet.b.volumes()) == (set(), {uuid})
    assert (fleet.a.state(uuid), fleet.b.state(uuid)) == (None, RUNNING)
    assert fleet.ok("delete", uuid)["status"] == "DELETED"


def test_force_delete_in_the_middle_of_the_copy_leaves_nothing_anywhere(fleet: Fleet) -> None:
    """A force delete while a -> b streams the disk stops the copy: the instance is deleted, neither host keeps a domain or a disk, and the migrate command fails."""
    uuid = fleet.big_stopped("doomed")
    deleter = fleet.start("force-delete", uuid, "--json", gate=True)  # loaded now, run on the gate
    mover = fleet.start("migrate", uuid, "--host", "b", "--json")
    step = wait_until("the copy to start", lambda: fleet.copy_step(uuid), 60, interval=0.02)
    assert step["bytes_done"] < step["bytes_total"]
    assert deleter.stdin is not None
    deleter.stdin.write("go\n")
    deleter.stdin.flush()
    out, _ = deleter.communicate(timeout=120)
    assert deleter.returncode == 0, out
    assert json.loads(out)["status"] == "DELETED"
    out, _ = mover.communicate(timeout=120)
    assert mover.returncode != 0
    assert json.loads(out)["error"] == "Preempted"
    (move,) = [t for t in fleet.ok("tasks", uuid) if t["operation"] == "migrate"]
    assert move["outcome"] == "preempted"
    (copy,) = [s for s in move["steps"] if s["name"] == "resize_finish"]
    assert 0 < copy["bytes_done"] < copy["bytes_total"]  # stopped in the middle of the copy
    assert fleet.show(uuid)["vm_state"] == "deleted"
    for host in (fleet.a, fleet.b):
        assert host.domain(uuid) is None
        assert uuid not in host.volumes()


def test_a_copy_cut_by_sigkill_is_finished_by_recover(fleet: Fleet) -> None:
    """After the engine moving a disk a -> b is SIGKILLed mid-copy, `recover --owner --force` finishes the move: resized on b with the same disk, a's disk kept until confirm."""
    a, b = fleet.a, fleet.b
    uuid = fleet.big_stopped("survivor")
    before = a.digest(uuid)
    mover = fleet.start("migrate", uuid, "--host", "b", "--json")
    step = wait_until("the copy to start", lambda: fleet.copy_step(uuid), 60, interval=0.02)
    mover.kill()
    mover.communicate(timeout=30)
    assert step["bytes_done"] < step["bytes_total"]
    (move,) = [t for t in fleet.ok("tasks", uuid) if t["operation"] == "migrate"]
    assert move["outcome"] == "running"  # nobody ended it: its owner is dead, its lease still live
    (copy,) = [s for s in move["steps"] if s["name"] == "resize_finish"]
    assert copy["bytes_done"] < copy["bytes_total"]
    assert fleet.show(uuid)["task_state"] == "resize_finish"

    recovered = fleet.ok("recover", "--owner", move["owner"], "--force")
    assert [(r["task_id"], r["outcome"]) for r in recovered] == [(move["id"], "succeeded")], recovered
    out = fleet.show(uuid)
    assert (out["host"], out["status"], out["task_state"]) == ("b", "VERIFY_RESIZE", None)
    assert (a.state(uuid), b.state(uuid)) == (None, SHUTOFF)
    assert a.volumes() == {uuid}  # the source keeps its disk until confirm
    assert b.digest(uuid) == before
    assert fleet.ok("confirm-resize", uuid)["status"] == "SHUTOFF"
    assert (a.volumes(), b.volumes()) == (set(), {uuid})
    assert fleet.ok("delete", uuid)["status"] == "DELETED"


def test_a_copy_to_a_frozen_host_rolls_back_onto_the_source(fleet: Fleet) -> None:
    """When b's libvirtd stops answering mid-copy, keepalive ends the copy within 40 s: the guest is back on a as it was, the migration in error, the task failed with CopyFailed, and b keeps nothing."""
    a, b = fleet.a, fleet.b
    uuid = fleet.big_stopped("stranded")
    mover = fleet.start("migrate", uuid, "--host", "b", "--json")
    wait_until("the copy to start", lambda: fleet.copy_step(uuid), 60, interval=0.02)
    with frozen(fleet.remote):
        frozen_at = time.monotonic()
        out, _ = mover.communicate(timeout=90)
        took = time.monotonic() - frozen_at
        assert mover.returncode == 1, out
        assert json.loads(out)["error"] == "TaskFailed"
        assert took < 40, f"the copy to a silent host ended after {took:.0f} s"
        shown = fleet.show(uuid)
        assert (shown["host"], shown["status"], shown["task_state"]) == ("a", "SHUTOFF", None)
        assert a.state(uuid) == SHUTOFF
        assert a.volumes() == {uuid}
        (move,) = fleet.ok("migration", "list")
        assert (move["status"], move["dest_host"]) == ("error", "b")
        (task,) = [t for t in fleet.ok("tasks", uuid) if t["operation"] == "migrate"]
        assert task["outcome"] == "failed" and "CopyFailed" in task["error"], task["error"]
    # b answers again. The engine could not delete its partial copy while b was silent: it must be gone
    # at the latest once b has had what its daemon gives it, a sync pass and an image cache cleanup.
    fleet.ok("sync", "--once", "--host", "b")
    fleet.ok("image", "cleanup", "--host", "b", "--max-age", "0")
    assert b.domain(uuid) is None
    assert b.volumes() == set(), "a partial copy of the disk is left on b"
    assert fleet.ok("delete", uuid)["status"] == "DELETED"


def test_a_frozen_host_goes_down_for_the_scheduler_alone_and_comes_back(fleet: Fleet, tmp_path: Path) -> None:
    """While b's libvirtd is SIGSTOPped under a daemon, a keeps heartbeating and getting sync passes, b goes down (a create lands on a), and b comes back up by itself."""
    fast = {"host_down_after": 3}  # heartbeats every second
    log = tmp_path / "daemon.log"
    log_options = ["--log-format", "json", "--log-level", "info"]  # one JSON line per sync pass
    daemon = fleet.start(*log_options, "daemon", "--interval", "1", "--claim-interval", "0.5", settings=fast, log=log)
    created = []
    try:
        start = datetime.now(UTC)
        wait_until(
            "both hosts to heartbeat",
            lambda: all(h["last_heartbeat"] and stamp(h["last_heartbeat"]) > start for h in fleet.hosts().values()),
            30,
        )
        created.append(fleet.create("preferred", None, **fast))
        assert fleet.show(created[0])["host"] == "b"  # up, b has more free RAM: the scheduler picks it

        def passes(host: str) -> int:
            return sum(1 for e in log_events(log) if e.get("event") == "sync_pass" and e.get("host") == host)

        def silent() -> dict[str, Any] | None:
            b = fleet.hosts()["b"]
            return b if datetime.now(UTC) - stamp(b["last_heartbeat"]) > timedelta(seconds=4) else None

        with frozen(fleet.remote):
            frozen_at = datetime.now(UTC)
            down = wait_until("b to miss its heartbeats", silent, 30, interval=0.2)
            assert stamp(down["last_heartbeat"]) < frozen_at + timedelta(seconds=2)
            beat, count = fleet.hosts()["a"]["last_heartbeat"], passes("a")
            wait_until(
                "a to heartbeat meanwhile", lambda: stamp(fleet.hosts()["a"]["last_heartbeat"]) > stamp(beat), 30
            )
            wait_until("a's sync passes while b is silent", lambda: passes("a") >= count + 2, 30, interval=0.2)
            created.append(fleet.create("placed", None, **fast))
            assert fleet.show(created[1])["host"] == "a"
            scheduling = [h["message"] for h in fleet.ok("history", created[1]) if "scheduled" in (h["message"] or "")]
            assert scheduling == ["scheduled to a (attempt 1 of 3)"]  # b was not even tried
            assert fleet.hosts()["b"]["last_heartbeat"] == down["last_heartbeat"]
            thawed_at = datetime.now(UTC)
        wait_until("b to heartbeat again", lambda: stamp(fleet.hosts()["b"]["last_heartbeat"]) > thawed_at, 60)
        assert daemon.poll() is None
    finally:
        stop_daemon(daemon)
    assert daemon.returncode == 0
    for uuid in created:
        assert fleet.ok("delete", uuid)["status"] == "DELETED"


def test_image_cleanup_on_the_remote_host_removes_only_unused_bases(fleet: Fleet) -> None:
    """`image cleanup --host b --max-age 0` keeps b's cached base while an instance on b uses it and removes it once that instance is deleted, leaving a's cache alone."""
    on_a, on_b = fleet.create("here", "a"), fleet.create("there", "b")
    (base,) = fleet.b.volumes("_base")
    assert fleet.a.volumes("_base") == {base}
    assert fleet.ok("image", "cleanup", "--host", "b", "--max-age", "0") == {"removed": []}
    assert fleet.b.volumes("_base") == {base}  # in use by the instance on b
    assert fleet.ok("delete", on_b)["status"] == "DELETED"
    removed = fleet.ok("image", "cleanup", "--host", "b", "--max-age", "0")["removed"]
    assert [PurePosixPath(r).name for r in removed] == [base]
    assert fleet.b.volumes("_base") == set()
    assert fleet.a.volumes("_base") == {base}  # another host's cache: untouched
    assert fleet.ok("delete", on_a)["status"] == "DELETED"


def test_delete_on_a_silent_host_that_is_down_ends_as_a_local_delete(fleet: Fleet) -> None:
    """With b's libvirtd SIGSTOPped and b's heartbeat older than host_down_after, `delete` of an instance on b ends in seconds as a local delete, and a sync pass reaps the guest once b answers again."""
    uuid = fleet.create("cut-off", "b")
    clock = ManualClock(datetime.now(UTC))  # b's last heartbeat is the fixture's: no daemon renews it
    with fleet.engine(clock, host_down_after=3.0) as engine, frozen(fleet.remote):  # thawed before the engine closes
        clock.advance(4)  # b down: its heartbeat is older than host_down_after
        deleting = threading.Thread(target=engine.delete, args=(uuid,), name="delete", daemon=True)
        deleting.start()
        wait_until("the delete of an instance on a silent host that is down", lambda: not deleting.is_alive(), 60)
        assert engine.get(uuid).vm_state is VmState.DELETED
        history = [h.message or "" for h in engine.history(uuid)]
        assert [m for m in history if "deleted locally" in m], history
    assert fleet.b.state(uuid) == RUNNING  # the guest lived on while b was silent
    fleet.ok("sync", "--once", "--host", "b")
    assert fleet.b.domain(uuid) is None
    assert fleet.b.volumes() == set()
