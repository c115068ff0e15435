"""An in-memory hypervisor with the contract's reference semantics and scripted faults.

Used for fast tests and for fault injection; it passes the same contract suite
as the libvirt driver. Faults:

- ``fail_next(call, error)``: the next ``call`` raises ``error`` before acting;
- ``fail_after(call, error)``: the next ``call`` acts, then raises ``error``
  (the hypervisor did part of the work and reported a failure);
- ``hold(call)``: the next ``call`` blocks until the returned gate is released;
- ``hold("copy")`` and the others above on ``"copy"``: a move's disk copy
  calls ``copy`` once per chunk it moves, so a fault there strikes with the
  copy in flight;
- ``crash_after(call)``: the next ``call`` acts, then raises
  :class:`SimulatedCrash` (a ``BaseException``, so nothing in the engine
  catches it: the caller behaves as if its process died there);
- ``set_power`` and ``undefine``: change a domain behind the engine's back;
- ``unreachable = True``: every call raises :class:`DriverUnavailable` (a host
  whose hypervisor does not answer) until it is set back to False;
- ``busy_pool(answers)``: the next ``answers`` calls that work on the host's
  storage pool are refused as busy first, as libvirt's storage driver refuses
  a pool call while another call builds a volume there (see
  :mod:`drivers.storage`); the driver waits each out as the libvirt driver
  does (:func:`drivers.base.wait_out`), and past ``busy_seconds`` the call
  fails as a :class:`DriverError` naming the busy pool, never as a missing
  domain.

Disks are volumes with a content (a string): a new one holds its image's
name, ``write`` appends a data marker to a running guest's disk, and a move or
a snapshot carries the content over, so a test can check no data is lost.
Domains carry the stamp of the attempt that made or last took them, and
volumes are named after it, as on libvirt.

With ``state_path`` the domains are kept in a JSON file, so separate processes
(the CLI) see one hypervisor.
"""

from __future__ import annotations

import fcntl
import json
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drivers.base import (
    Attempt,
    Console,
    DiskRead,
    DiskSource,
    DomainSpec,
    Driver,
    EventListener,
    HostObject,
    LifecycleEvent,
    Listing,
    Progress,
    RebootType,
    Transition,
    volume_name,
    volume_tag,
    wait_out,
)
from lifecycle.errors import CopyFailed, DomainNotFound, DriverError, DriverUnavailable, Fenced, StaleObject
from lifecycle.states import PowerState

__all__ = ["FakeDriver", "Gate", "SimulatedCrash"]

P = PowerState
_CHUNK = 16 * 1024
_HOLE = 1024 * 1024
_TRANSITIONS = {P.RUNNING: Transition.STARTED, P.SHUTDOWN: Transition.STOPPED, P.PAUSED: Transition.PAUSED}


class SimulatedCrash(BaseException):
    """Raised by ``crash_after``: the process is considered dead at this point."""


class Gate:
    """A held call: ``entered`` is set once the call blocks; ``release`` lets it go on.

    A held call goes on by itself after ``timeout`` seconds, so a test that
    fails before releasing its gate ends instead of hanging the suite.
    """

    def __init__(self, timeout: float = 30.0) -> None:
        self.entered = threading.Event()
        self._released = threading.Event()
        self._timeout = timeout

    def release(self) -> None:
        """Let the held call continue."""
        self._released.set()

    def wait_entered(self, timeout: float = 10.0) -> bool:
        """Block until the held call has started; False on timeout."""
        return self.entered.wait(timeout)

    def _block(self) -> None:
        self.entered.set()
        self._released.wait(self._timeout)


@dataclass(slots=True)
class _Domain:
    spec: dict[str, Any]
    power: int
    disk: str
    rescued: bool = False
    saved: bool = False
    ignores_acpi: bool = False
    vnc_port: int = 5900
    task_id: str | None = None
    epoch: int = 0

    def stamp(self, attempt: Attempt | None) -> None:
        self.task_id = None if attempt is None else attempt.task_id
        self.epoch = 0 if attempt is None else attempt.epoch

    def task_tag(self) -> str | None:
        return None if self.task_id is None else self.task_id.replace("-", "")[:12]


_POOL_CALLS = frozenset(
    {
        "spawn",
        "destroy",
        "remove",
        "objects",
        "migrate_disk_and_power_off",
        "finish_migration",
        "finish_revert_migration",
        "confirm_migration",
        "snapshot",
        "spawn_from_snapshot",
        "rescue",
        "unrescue",
    }
)
"""Calls that create, delete, list or stream volumes of the host's pools (busy_pool answers them)."""


class _Busy(Exception):
    """A busy pool's answer inside the fake (waited out; never leaves the driver as itself)."""


class FakeDriver(Driver):
    """One fake host. Thread-safe; held calls block outside the state lock."""

    def __init__(self, name: str = "fake", *, state_path: str | Path | None = None) -> None:
        self.name = name
        self.calls: list[str] = []
        self._lock = threading.RLock()
        self._domains: dict[str, _Domain] = {}
        self._volumes: dict[str, str] = {}
        """Root volume name to content."""
        self._foreign: list[str] = []
        self._faults: dict[str, list[tuple[str, Any]]] = {}
        self._listener: EventListener | None = None
        self._events: queue.Queue[LifecycleEvent | None] = queue.Queue()
        self._dispatcher: threading.Thread | None = None
        self._state_path = Path(state_path) if state_path else None
        self._next_port = 5900
        self.unreachable = False
        """While True, every call raises DriverUnavailable, as a hypervisor that does not answer."""
        self._busy = 0
        self.busy_seconds = 2.0
        """How long a busy pool answer is waited out (the libvirt driver: ``drivers.storage.BUSY_SECONDS``)."""
        self.busy_answers = 0
        """How many busy answers the driver has waited out so far."""

    # -- fault injection ---------------------------------------------------

    def fail_next(self, call: str, error: BaseException | None = None) -> None:
        """Make the next ``call`` raise ``error`` (a DriverError by default) before acting."""
        exc = error or DriverError(f"injected failure in {call}", call=call)
        self._faults.setdefault(call, []).append(("fail", exc))

    def fail_after(self, call: str, error: BaseException | None = None) -> None:
        """Make the next ``call`` act, then raise ``error`` (a DriverError by default)."""
        exc = error or DriverError(f"injected failure after {call}", call=call)
        self._faults.setdefault(call, []).append(("fail_after", exc))

    def hold(self, call: str) -> Gate:
        """Make the next ``call`` block until the returned gate is released."""
        gate = Gate()
        self._faults.setdefault(call, []).append(("hold", gate))
        return gate

    def busy_pool(self, answers: int) -> None:
        """Make the next ``answers`` storage-pool calls of this host answer busy once each before acting."""
        with self._lock:
            self._busy += answers

    def crash_after(self, call: str) -> None:
        """Make the next ``call`` complete, then raise :class:`SimulatedCrash`."""
        self._faults.setdefault(call, []).append(("crash", None))

    def set_power(self, uuid: str, power: PowerState, *, event: bool = True) -> None:
        """Change a domain's power behind the engine's back; ``event=False`` does it silently (only a pass sees it)."""
        with self._state():
            self._domain(uuid, "set_power").power = int(power)
        if event:
            self._emit(uuid, power)

    def clear_faults(self, call: str | None = None) -> None:
        """Drop the scripted faults not yet consumed (of ``call``, or of every call); held gates stay held."""
        with self._lock:
            if call is None:
                self._faults.clear()
            else:
                self._faults.pop(call, None)

    def copy_domain_from(self, other: FakeDriver, uuid: str) -> None:
        """Define here the same domain and disk ``other`` has (a guest that seems to live on two hosts)."""
        with other._state():
            dom = other._domain(uuid, "copy_domain_from")
            content = other._volumes.get(dom.disk, "")
        with self._state():
            self._domains[uuid] = _Domain(**asdict(dom))
            self._volumes[dom.disk] = content

    def undefine(self, uuid: str) -> None:
        """Remove a domain behind the engine's back (its disk stays)."""
        with self._state():
            self._domains.pop(uuid, None)

    def write(self, uuid: str, marker: str) -> None:
        """Write ``marker`` into a running guest's disk (what a guest's user does between operations)."""
        with self._state():
            dom = self._domain(uuid, "write")
            if dom.power != P.RUNNING:
                raise DriverError(f"cannot write to {uuid}: guest is not running", uuid=uuid, call="write")
            self._volumes[dom.disk] = self._volumes.get(dom.disk, "") + f"|{marker}"

    def volumes(self) -> dict[str, str]:
        """Return every root volume here with its content."""
        with self._state():
            return dict(self._volumes)

    def domain_disk(self, uuid: str) -> str | None:
        """Return the content of the disk the domain of ``uuid`` uses (None: no domain)."""
        with self._state():
            dom = self._domains.get(uuid)
            return None if dom is None else self._volumes.get(dom.disk)

    def add_foreign(self, name: str) -> None:
        """Add a domain that no instance owns."""
        with self._state():
            self._foreign.append(name)

    def set_ignores_acpi(self, uuid: str, ignores: bool = True) -> None:
        """Make a guest ignore clean shutdown requests (a guest with no OS)."""
        with self._state():
            self._domain(uuid, "set_ignores_acpi").ignores_acpi = ignores

    def domain_exists(self, uuid: str) -> bool:
        """Return whether a domain is defined for ``uuid``."""
        with self._state():
            return uuid in self._domains

    def disk_of(self, uuid: str) -> str:
        """Return the name of the domain's disk (changes on rebuild)."""
        with self._state():
            return self._domain(uuid, "disk_of").disk

    # -- the contract --------------------------------------------------------

    def spawn(self, spec: DomainSpec, *, power_on: bool = True) -> str:
        def act() -> PowerState | None:
            dom = self._adopt(spec, "spawn")
            if dom is None:
                name = volume_name(spec.uuid, spec.attempt)
                _holds(spec)
                self._volumes.setdefault(name, f"image:{spec.image_path}")
                dom = _Domain(_spec(spec), int(P.SHUTDOWN), name, vnc_port=self._port())
                dom.stamp(spec.attempt)
                self._domains[spec.uuid] = dom
            if power_on and dom.power != P.RUNNING:
                _holds(spec)
                dom.power = int(P.RUNNING)
                return P.RUNNING
            return None

        self._call("spawn", spec.uuid, act)
        return self._domains_disk(spec.uuid)

    def _adopt(self, spec: DomainSpec, call: str) -> _Domain | None:
        """Return the domain of ``spec`` here if the call may take it (stamped anew), None if there is none."""
        dom = self._domains.get(spec.uuid)
        if dom is None:
            return None
        attempt = spec.attempt
        if attempt is not None and dom.task_id == attempt.task_id and dom.epoch > attempt.epoch:
            raise Fenced(attempt.task_id, spec.uuid, attempt.epoch, dom.epoch)
        if dom.task_id != (None if attempt is None else attempt.task_id) and dom.disk != spec.disk:
            raise StaleObject(
                f"{call}: a domain of {spec.uuid} made by another attempt (task {dom.task_id}, epoch {dom.epoch},"
                f" disk {dom.disk}) is on {self.name}: never adopted nor started",
                uuid=spec.uuid,
                call=call,
            )
        dom.stamp(attempt)
        return dom

    def _domains_disk(self, uuid: str) -> str:
        with self._state():
            return self._domain(uuid, "spawn").disk

    def destroy(self, uuid: str, *, destroy_disks: bool = True, attempt: Attempt | None = None) -> None:
        def act() -> PowerState | None:
            dom = self._domains.get(uuid)
            ours = attempt is None or (
                dom is not None and dom.task_id == attempt.task_id and dom.epoch <= attempt.epoch
            )
            if dom is not None and ours:
                del self._domains[uuid]
            else:
                dom = None
            if destroy_disks:
                used = {d.disk for d in self._domains.values()}
                for name in self._names(uuid):
                    task_tag, epoch = _split(volume_tag(uuid, name))
                    mine = attempt is None or (task_tag == attempt.task_tag and (epoch or 0) <= attempt.epoch)
                    if name not in used and mine:
                        del self._volumes[name]
            return P.SHUTDOWN if dom is not None and dom.power != P.SHUTDOWN else None

        self._call("destroy", uuid, act)

    def objects(self, uuid: str) -> list[HostObject]:
        self._before("objects")
        with self._state():
            found = []
            dom = self._domains.get(uuid)
            if dom is not None:
                running = dom.power in (P.RUNNING, P.PAUSED)
                found.append(HostObject("domain", uuid, dom.task_tag(), dom.epoch, running, (dom.disk,)))
            for name in self._names(uuid):
                tag = volume_tag(uuid, name)
                task_tag, epoch = _split(tag)
                found.append(HostObject("volume", name, task_tag, epoch))
            return found

    def remove(self, uuid: str, objects: list[HostObject]) -> list[str]:
        removed: list[str] = []

        def act() -> PowerState | None:
            changed = None
            for obj in objects:
                if obj.kind == "domain":
                    dom = self._domains.get(uuid)
                    if dom is not None and (dom.task_tag(), dom.epoch) == (obj.task_tag, obj.epoch):
                        del self._domains[uuid]
                        removed.append(obj.name)
                        changed = P.SHUTDOWN if dom.power != P.SHUTDOWN else changed
            used = {d.disk for d in self._domains.values()}
            for obj in objects:
                if obj.kind == "volume" and obj.name in self._volumes and obj.name not in used:
                    del self._volumes[obj.name]
                    removed.append(obj.name)
            return changed

        self._call("remove", uuid, act)
        return removed

    def _names(self, uuid: str) -> list[str]:
        return sorted(n for n in self._volumes if n == uuid or n.startswith(uuid + "."))

    def power_on(self, spec: DomainSpec) -> None:
        def act() -> PowerState | None:
            dom = self._domain(spec.uuid, "power_on")
            dom.saved = False
            return self._set(dom, P.RUNNING)

        self._call("power_on", spec.uuid, act)

    def power_off(self, uuid: str, *, timeout: float, retry_interval: float) -> bool:
        clean = [False]

        def act() -> PowerState | None:
            dom = self._domain(uuid, "power_off")
            clean[0] = dom.power != P.RUNNING or (timeout > 0 and not dom.ignores_acpi)
            self.calls.append("power_off:clean" if clean[0] else "power_off:destroy")
            return self._set(dom, P.SHUTDOWN)

        self._call("power_off", uuid, act)
        return clean[0]

    def reboot(self, spec: DomainSpec, kind: RebootType) -> None:
        def act() -> PowerState | None:
            if kind is RebootType.HARD and spec.uuid not in self._domains and spec.root in self._volumes:
                # Defined anew from the database and the disk, as a hard reboot regenerates the domain.
                dom = _Domain(_spec(spec), int(P.SHUTDOWN), spec.root, vnc_port=self._port())
                dom.stamp(spec.attempt)
                self._domains[spec.uuid] = dom
            dom = self._domain(spec.uuid, "reboot")
            if kind is RebootType.SOFT and dom.power != P.RUNNING:
                raise DriverError(f"soft reboot of {spec.uuid}: guest is not running", uuid=spec.uuid, call="reboot")
            dom.saved = False
            dom.power = int(P.RUNNING)
            return P.RUNNING

        self._call("reboot", spec.uuid, act)

    def pause(self, uuid: str) -> None:
        self._call("pause", uuid, lambda: self._change(uuid, "pause", {P.RUNNING, P.PAUSED}, P.PAUSED))

    def unpause(self, uuid: str) -> None:
        self._call("unpause", uuid, lambda: self._change(uuid, "unpause", {P.RUNNING, P.PAUSED}, P.RUNNING))

    def suspend(self, uuid: str) -> None:
        def act() -> PowerState | None:
            dom = self._domain(uuid, "suspend")
            if dom.saved:
                return None
            result = self._change(uuid, "suspend", {P.RUNNING, P.PAUSED}, P.SHUTDOWN)
            dom.saved = True
            return result

        self._call("suspend", uuid, act)

    def resume(self, spec: DomainSpec) -> None:
        def act() -> PowerState | None:
            dom = self._domain(spec.uuid, "resume")
            dom.saved = False
            return self._set(dom, P.RUNNING)

        self._call("resume", spec.uuid, act)

    def rescue(self, spec: DomainSpec) -> None:
        def act() -> PowerState | None:
            dom = self._domain(spec.uuid, "rescue")
            dom.rescued = True
            return self._set(dom, P.RUNNING)

        self._call("rescue", spec.uuid, act)

    def unrescue(self, spec: DomainSpec) -> None:
        def act() -> PowerState | None:
            dom = self._domain(spec.uuid, "unrescue")
            dom.rescued = False
            return self._set(dom, P.RUNNING)

        self._call("unrescue", spec.uuid, act)

    def migrate_disk_and_power_off(
        self,
        uuid: str,
        *,
        timeout: float,
        retry_interval: float,
        disk: str | None = None,
        attempt: Attempt | None = None,
    ) -> str:
        kept = [disk or uuid]

        def act() -> PowerState | None:
            dom = self._domains.get(uuid)
            if dom is None:
                if kept[0] in self._volumes:
                    return None
                raise DomainNotFound(uuid, call="migrate_disk_and_power_off")
            if attempt is not None and dom.task_id == attempt.task_id and dom.epoch > attempt.epoch:
                raise Fenced(attempt.task_id, uuid, attempt.epoch, dom.epoch)
            if attempt is not None:
                attempt.holds()
            del self._domains[uuid]
            kept[0] = dom.disk
            return P.SHUTDOWN if dom.power != P.SHUTDOWN else None

        self._call("migrate_disk_and_power_off", uuid, act)
        return kept[0]

    def read_disk(self, uuid: str, disk: str | None = None) -> AbstractContextManager[DiskRead]:
        return self._reading(uuid, disk or uuid)

    @contextmanager
    def _reading(self, uuid: str, disk: str) -> Iterator[DiskRead]:
        self._before("read_disk")
        with self._state():
            content = self._volumes.get(disk)
            if content is None:
                raise DomainNotFound(uuid, call="read_disk")
        data = content.encode()
        # The content, a hole, then four chunks of padding: enough for progress and faults between chunks.
        segments: list[bytes | int] = [data, _HOLE, *(bytes([n]) * _CHUNK for n in range(1, 5))]
        yield DiskRead(segments=iter(segments), total=len(data) + 4 * _CHUNK)

    def finish_migration(
        self, spec: DomainSpec, source: DiskSource, *, power_on: bool, progress: Progress | None = None
    ) -> str:
        return self._receive("finish_migration", spec, source, power_on, progress)

    def _receive(
        self, call: str, spec: DomainSpec, source: DiskSource, power_on: bool, progress: Progress | None
    ) -> str:
        """Define the domain on a copy of ``source`` unless this task's exists, start it if ``power_on``."""
        after = self._before(call)
        with self._state():
            dom = self._adopt(spec, call)
        if dom is None:
            name = volume_name(spec.uuid, spec.attempt)
            with self._state():
                self._volumes[name] = ""  # the copy's volume, this attempt's own
            try:
                content = self._copy(call, source, progress)
            except BaseException as exc:
                if not isinstance(exc, SimulatedCrash):  # a dead process cleans nothing up: its copy stays
                    with self._state():
                        self._volumes.pop(name, None)  # its own partial copy only: named after this attempt
                raise
            with self._state():
                _holds(spec)  # the epoch, right before the define: a stalled worker stops here
                self._volumes[name] = content
                dom = self._adopt(spec, call) or _Domain(_spec(spec), int(P.SHUTDOWN), name, vnc_port=self._port())
                dom.stamp(spec.attempt)
                self._domains[spec.uuid] = dom
        with self._state():
            dom = self._domain(spec.uuid, call)  # read again: with a state file, each hold reloads it
            if power_on:
                _holds(spec)
            changed = self._set(dom, P.RUNNING) if power_on else None
        if changed is not None:
            self._emit(spec.uuid, changed)
        if after is not None:
            raise after
        return dom.disk

    def _copy(self, call: str, source: DiskSource, progress: Progress | None) -> str:
        """Read the moved disk chunk by chunk (each a ``copy`` call); return the content it carried."""
        done, content = 0, None
        try:
            with source() as read:
                for segment in read.segments:
                    if isinstance(segment, int):
                        continue
                    after = self._before("copy")
                    content = segment if content is None else content
                    done += len(segment)
                    if progress is not None:
                        progress(done, read.total)
                    if after is not None:
                        raise after
        except DriverError as exc:
            raise CopyFailed(f"disk copy failed: {exc}", call=call) from exc
        return (content or b"").decode()

    def snapshot(self, spec: DomainSpec, target: Path) -> None:
        def act() -> PowerState | None:
            dom = self._domains.get(spec.uuid)
            if dom is not None and dom.power == P.RUNNING:
                raise DriverError(f"cannot snapshot {spec.uuid}: domain is running", uuid=spec.uuid, call="snapshot")
            disk = dom.disk if dom is not None else spec.root
            if disk not in self._volumes:
                raise DomainNotFound(spec.uuid, call="snapshot")
            part = target.with_name(target.name + ".part")
            part.write_text(self._volumes[disk])
            part.replace(target)
            return None

        self._call("snapshot", spec.uuid, act)

    def spawn_from_snapshot(
        self, spec: DomainSpec, snapshot: Path, *, power_on: bool = True, progress: Progress | None = None
    ) -> str:
        return self._receive("spawn_from_snapshot", spec, _file_source(snapshot), power_on, progress)

    def confirm_migration(self, uuid: str, disk: str | None = None) -> None:
        def act() -> PowerState | None:
            name = disk or uuid
            if name not in {d.disk for d in self._domains.values()}:
                self._volumes.pop(name, None)
            return None

        self._call("confirm_migration", uuid, act)

    def finish_revert_migration(self, spec: DomainSpec, *, power_on: bool) -> None:
        def act() -> PowerState | None:
            dom = self._domains.get(spec.uuid)
            if dom is not None and dom.disk != spec.root:
                raise StaleObject(
                    f"finish_revert_migration: the domain of {spec.uuid} on {self.name} uses {dom.disk}, not the kept"
                    f" disk {spec.root}: never adopted",
                    uuid=spec.uuid,
                    call="finish_revert_migration",
                )
            if dom is None:
                if spec.root not in self._volumes:
                    raise DomainNotFound(spec.uuid, call="finish_revert_migration")
                _holds(spec)
                dom = _Domain(_spec(spec), int(P.SHUTDOWN), spec.root, vnc_port=self._port())
                self._domains[spec.uuid] = dom
            dom.stamp(spec.attempt)
            if power_on:
                _holds(spec)
            return self._set(dom, P.RUNNING if power_on else P.SHUTDOWN)

        self._call("finish_revert_migration", spec.uuid, act)

    def kept_disks(self) -> list[str]:
        """Return the uuids that have a root volume here no domain uses (a move's kept disk, a leftover)."""
        with self._state():
            used = {d.disk for d in self._domains.values()}
            return sorted({n.split(".", 1)[0] for n in self._volumes if n not in used})

    def get_info(self, uuid: str) -> PowerState:
        self._before("get_info")
        with self._state():
            return PowerState(self._domain(uuid, "get_info").power)

    def list_instances(self) -> Listing:
        self._before("list_instances")
        with self._state():
            owned = {u: PowerState(d.power) for u, d in self._domains.items()}
            return Listing(owned=owned, foreign=tuple(self._foreign))

    def get_vnc_console(self, uuid: str) -> Console:
        self._before("get_vnc_console")
        with self._state():
            dom = self._domain(uuid, "get_vnc_console")
            if dom.power not in (P.RUNNING, P.PAUSED):  # as QEMU: a guest that is not running serves no VNC
                raise DriverError(
                    f"domain of {uuid} has no VNC port (is it running?)", uuid=uuid, call="get_vnc_console"
                )
            return Console(host="127.0.0.1", port=dom.vnc_port)

    def register_event_listener(self, listener: EventListener | None) -> None:
        with self._lock:
            self._listener = listener
            if listener is not None and self._dispatcher is None:
                # One thread, one queue: events reach the listener off the caller's
                # thread and in the order they happened (STOPPED before STARTED).
                self._dispatcher = threading.Thread(target=self._dispatch, name=f"fake-events-{self.name}", daemon=True)
                self._dispatcher.start()

    def _dispatch(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            listener = self._listener
            if listener is not None:
                listener(event)

    def close(self) -> None:
        with self._lock:  # a listener being registered on another thread starts its dispatcher under the lock
            dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            self._events.put(None)
            dispatcher.join(timeout=5)

    # -- machinery -----------------------------------------------------------

    def _call(self, call: str, uuid: str, act: Callable[[], PowerState | None]) -> None:
        after = self._before(call)
        with self._state():
            changed = act()
        if changed is not None:
            self._emit(uuid, changed)
        if after is not None:
            raise after

    def _before(self, call: str) -> BaseException | None:
        """Record the call and apply its scripted fault; return what to raise after acting."""
        if self.unreachable:
            raise DriverUnavailable(f"{call}: hypervisor {self.name} unreachable (injected)", call=call)
        if call in _POOL_CALLS:
            self._pool_ready(call)
        with self._lock:
            self.calls.append(call)
            queue = self._faults.get(call)
            kind, arg = queue.pop(0) if queue else ("", None)
        if kind == "fail":
            assert isinstance(arg, BaseException)
            raise arg
        if kind == "hold":
            assert isinstance(arg, Gate)
            arg._block()
        if kind == "crash":
            return SimulatedCrash(f"crash after {call}")
        return arg if kind == "fail_after" else None

    def _pool_ready(self, call: str) -> None:
        """Wait out the busy answers the storage pool gives ``call`` (busy_pool); DriverError past busy_seconds."""

        def answer() -> None:
            with self._lock:
                if self._busy <= 0:
                    return
                self._busy -= 1
                self.busy_answers += 1
            raise _Busy(f"pool '{self.name}-disks' has asynchronous jobs running.")

        try:
            wait_out(answer, lambda exc: isinstance(exc, _Busy), seconds=self.busy_seconds, first=0.001, most=0.05)
        except _Busy as exc:
            raise DriverError(
                f"{call} failed on {self.name}: {exc} (still busy after {self.busy_seconds:.0f} s of retries)",
                call=call,
            ) from exc

    def _domain(self, uuid: str, call: str) -> _Domain:
        dom = self._domains.get(uuid)
        if dom is None:
            raise DomainNotFound(uuid, call=call)
        return dom

    def _change(self, uuid: str, call: str, allowed: set[PowerState], to: PowerState) -> PowerState | None:
        dom = self._domain(uuid, call)
        if dom.power not in allowed:
            state = PowerState(dom.power).name.lower()
            raise DriverError(f"cannot {call} {uuid}: domain is {state}", uuid=uuid, call=call)
        return self._set(dom, to)

    @staticmethod
    def _set(dom: _Domain, power: PowerState) -> PowerState | None:
        if dom.power == power:
            return None
        dom.power = int(power)
        return power

    def _port(self) -> int:
        self._next_port += 1
        return self._next_port - 1

    def _emit(self, uuid: str, power: PowerState) -> None:
        transition = _TRANSITIONS.get(power)
        if self._listener is not None and transition is not None:
            self._events.put(LifecycleEvent(uuid, transition, datetime.now(UTC)))

    @contextmanager
    def _state(self) -> Iterator[None]:
        """Hold the state: the thread lock, and with a state file an exclusive flock.

        With a file, the state is reloaded, acted on and saved under the flock,
        so several processes share one consistent host.
        """
        with self._lock:
            if self._state_path is None:
                yield
                return
            with open(self._state_path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self._state_path.exists():
                    self._load()
                yield
                self._save()

    def _save(self) -> None:
        assert self._state_path is not None
        data = {
            "domains": {u: asdict(d) for u, d in self._domains.items()},
            "volumes": self._volumes,
            "next_port": self._next_port,
        }
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self._state_path)

    def _load(self) -> None:
        assert self._state_path is not None
        data = json.loads(self._state_path.read_text())
        self._domains = {u: _Domain(**d) for u, d in data["domains"].items()}
        self._volumes = dict(data.get("volumes", {}))
        self._next_port = data["next_port"]


def _spec(spec: DomainSpec) -> dict[str, Any]:
    """Return what a fake domain keeps of its spec (plain values: saved as JSON)."""
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.name != "attempt"}


def _holds(spec: DomainSpec) -> None:
    """Check the call's attempt still holds (right before a destructive step)."""
    if spec.attempt is not None:
        spec.attempt.holds()


def _split(tag: str | None) -> tuple[str | None, int | None]:
    """Split a volume's attempt tag into its task tag and epoch."""
    if tag is None or "-" not in tag:
        return None, None
    task_tag, _, epoch = tag.rpartition("-")
    return task_tag, int(epoch) if epoch.isdigit() else None


def _file_source(path: Path) -> DiskSource:
    """Read a snapshot file the way a move reads a kept disk (one segment: a fake disk's content is its name)."""

    @contextmanager
    def reading() -> Iterator[DiskRead]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DriverError(
                f"snapshot {path} unreadable: {exc.strerror or exc}", call="spawn_from_snapshot"
            ) from None
        yield DiskRead(segments=iter([data]), total=len(data))

    return reading
