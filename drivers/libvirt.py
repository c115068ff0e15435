"""The libvirt driver: any libvirt URI (test:///..., qemu:///system, qemu+ssh://...).

``libvirt`` is imported behind a guard, only here. Three pieces of machinery:

- the connection, apart from per-domain calls: a close callback drops it, the
  next call reconnects with backoff, and calls made while the daemon is away
  raise :class:`DriverUnavailable` (transient) instead of crashing;
- :func:`_map_error`, the one place libvirt errors become ours, by error code,
  error domain and a re-read of the domain state, never by message (the test
  driver answers code 1 where QEMU answers 55); every mapped error keeps
  libvirt's own message and has the libvirt error as its ``__cause__``;
- ``_POWER``, the one table from libvirt domain states to :class:`PowerState`.

Domain XML is built with ElementTree from the instance, so a hostile name is
data, never markup. Domains are named ``lifecycle-<uuid>``; the instance's
own name lives in ``<title>`` and in the lifecycle ``<metadata>``.

Ownership reaches the hypervisor: the metadata also stamps the attempt (task
id, epoch, move) that made the domain or last took it over, and a root
volume is named ``<uuid>.<task tag>-<epoch>`` after the attempt that made it.
A call adopts only a domain of its own task (or one using the disk the
database records as current), never one of another attempt (StaleObject), and
one a later epoch took stops it (Fenced); clean-ups delete only volumes named
after their own attempt, and the epoch is checked (``Attempt.holds``) right
before each define, start, undefine and delete of a long call. What is left
between that check and the libvirt call itself is a window of one round trip.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from drivers._link import Guarded, Link, Opener
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
    Stamp,
    Transition,
    volume_name,
    volume_tag,
)
from drivers.images import ImageInfo, inspect_image, qemu_img, valid_uuid
from drivers.storage import (
    HostStorage,
    busy,
    file_segments,
    image_key,
    read_volume,
    volume_digest,
    write_file,
    write_volume,
)
from lifecycle.errors import CopyFailed, DomainNotFound, DriverError, DriverUnavailable, Fenced, StaleObject
from lifecycle.states import PowerState

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised where libvirt-python is absent
    libvirt = None

__all__ = ["LibvirtDriver", "domain_xml", "libvirt_available"]

log = structlog.get_logger(__name__)

R = TypeVar("R")
METADATA_NS = "https://lifecycle.invalid/xmlns/instance/1"
NAME_PREFIX = "lifecycle-"

# libvirt virDomainState -> PowerState, as Nova maps it (nova/virt/libvirt/guest.py).
_POWER = {
    0: PowerState.NOSTATE,  # VIR_DOMAIN_NOSTATE
    1: PowerState.RUNNING,  # VIR_DOMAIN_RUNNING
    2: PowerState.RUNNING,  # VIR_DOMAIN_BLOCKED (idle vCPU)
    3: PowerState.PAUSED,  # VIR_DOMAIN_PAUSED
    4: PowerState.SHUTDOWN,  # VIR_DOMAIN_SHUTDOWN (going down)
    5: PowerState.SHUTDOWN,  # VIR_DOMAIN_SHUTOFF
    6: PowerState.CRASHED,  # VIR_DOMAIN_CRASHED
    7: PowerState.SUSPENDED,  # VIR_DOMAIN_PMSUSPENDED
}
# libvirt lifecycle event types -> our transitions (Nova's mapping); others are dropped.
_EVENTS = {2: Transition.STARTED, 3: Transition.PAUSED, 4: Transition.RESUMED, 5: Transition.STOPPED}

_ERR_NO_DOMAIN = 42  # VIR_ERR_NO_DOMAIN
_ERR_NO_STORAGE_VOL = 50  # VIR_ERR_NO_STORAGE_VOL
_ERR_OPERATION_INVALID = 55  # VIR_ERR_OPERATION_INVALID: wrong state (QEMU)
_ERR_INTERNAL = 1  # VIR_ERR_INTERNAL_ERROR: wrong state (test driver), or a closed socket
_CONNECTION_CODES = {4, 39, 45}  # VIR_ERR_NO_CONNECT, VIR_ERR_RPC, VIR_ERR_AUTH_FAILED: always the link
# VIR_ERR_SYSTEM_ERROR is any OS error (a missing disk file answers it from the
# storage domain on a live connection); like Nova, only the remote and RPC
# domains make it a lost connection.
_ERR_SYSTEM = 38  # VIR_ERR_SYSTEM_ERROR
_FROM_STORAGE = 18  # VIR_FROM_STORAGE: the storage driver's errors (busy answers: drivers.storage)
_STUCK_SECONDS = 5.0  # a call in flight this long is stuck, for choosing a connection (a hung guest's monitor)
_MOST_LINKS = 16  # connections per host at most, stuck ones included
_LINK_DOMAINS = {7, 13}  # VIR_FROM_RPC, VIR_FROM_REMOTE


def libvirt_available() -> bool:
    """Return whether libvirt-python can be imported."""
    return libvirt is not None


_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    """Register libvirt's default event loop once per process and run it on a thread."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors become exceptions, not stderr noise

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def domain_xml(
    spec: DomainSpec, disk: str, *, domain_type: str, vnc_listen: str, rescue_disk: str | None = None
) -> str:
    """Return the domain XML for ``spec`` booting from ``disk`` (or ``rescue_disk`` first)."""
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = NAME_PREFIX + valid_uuid(spec.uuid)
    ET.SubElement(dom, "uuid").text = spec.uuid
    ET.SubElement(dom, "title").text = spec.name
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{METADATA_NS}}}instance")
    ET.SubElement(meta, f"{{{METADATA_NS}}}uuid").text = spec.uuid
    ET.SubElement(meta, f"{{{METADATA_NS}}}name").text = spec.name
    meta.append(_attempt_element(spec.attempt))
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    for tag, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(dom, tag).text = action
    devices = ET.SubElement(dom, "devices")
    disks = [rescue_disk, disk] if rescue_disk is not None else [disk]
    for index, path in enumerate(disks):
        el = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(el, "driver", name="qemu", type="qcow2")
        ET.SubElement(el, "source", file=path)
        ET.SubElement(el, "target", dev=f"vd{'abcdefgh'[index]}", bus="virtio")
    ET.SubElement(devices, "graphics", type="vnc", port="-1", autoport="yes", listen=vnc_listen)
    ET.register_namespace("lifecycle", METADATA_NS)
    return ET.tostring(dom, encoding="unicode")


def _attempt_element(attempt: Attempt | None) -> ET.Element:
    """Return the ``<lifecycle:attempt>`` stamp of ``attempt`` (empty for a call outside any task)."""
    el = ET.Element(f"{{{METADATA_NS}}}attempt")
    if attempt is not None:
        el.set("task", attempt.task_id)
        el.set("epoch", str(attempt.epoch))
        if attempt.migration_id is not None:
            el.set("migration", attempt.migration_id)
    return el


def _stamp_of(xml: str) -> Stamp:
    """Return the attempt a domain's XML is stamped with (no task: made before stamps, or outside any task)."""
    el = ET.fromstring(xml).find(f"./metadata/{{{METADATA_NS}}}instance/{{{METADATA_NS}}}attempt")
    if el is None or not el.get("task"):
        return Stamp(None)
    epoch = el.get("epoch", "0")
    return Stamp(el.get("task"), int(epoch) if epoch.isdigit() else 0, el.get("migration"))


def _root_volume(xml: str) -> str | None:
    """Return the name of a domain's root volume (its disk that is not a rescue disk)."""
    for source in _disk_sources(xml):
        name = source.rsplit("/", 1)[-1]
        if not name.endswith(".rescue"):
            return name
    return None


def _holds(attempt: Attempt | None) -> None:
    """Check the call's attempt still holds, right before a destructive step."""
    if attempt is not None:
        attempt.holds()


class LibvirtDriver(Driver):
    """One libvirt host, reached only through its libvirt connection (local or remote).

    ``instances_path`` is a path on the host, never opened here: the driver
    keeps the host's image cache and instance disks in two libvirt ``dir``
    pools under it (:mod:`drivers.storage`). ``domain_type`` is the libvirt domain type (``kvm``, ``qemu`` for TCG, and
    always ``test`` on a ``test:///`` URI). ``soft_reboot_seconds`` bounds the
    wait for a guest to go down on a soft reboot before a hard one (Nova: 120).
    """

    def __init__(
        self,
        uri: str,
        instances_path: str | Path,
        *,
        domain_type: str = "kvm",
        vnc_listen: str = "127.0.0.1",
        soft_reboot_seconds: float = 120.0,
        reconnect_seconds: float = 10.0,
        call_seconds: float = 20.0,
        connections: int = 4,
    ) -> None:
        if libvirt is None:
            raise DriverError("libvirt-python is not installed: pip install 'lifecycle[libvirt]'")
        self.uri = uri
        self.storage = HostStorage(str(instances_path))
        self.domain_type = "test" if uri.startswith("test:") else domain_type
        self.allocates_console_ports = self.domain_type != "test"
        self.vnc_listen = vnc_listen
        self.soft_reboot_seconds = soft_reboot_seconds
        self.reconnect_seconds = reconnect_seconds
        self.call_seconds = call_seconds
        """How long the call in flight on a connection may go without returning before its waiters give up."""
        if isinstance(connections, bool) or not isinstance(connections, int) or not 1 <= connections <= 64:
            raise DriverError(f"connections must be an integer from 1 to 64, got {connections!r}")
        self.connections = connections
        """How many connections the driver keeps to its host at most: one call in flight on each
        (:mod:`drivers._link`), so this many calls run on libvirtd at once."""
        self._lock = threading.RLock()
        self._link: Link | None = None
        """The first connection: it carries the domain events, and its loss is a lost host."""
        self._spare: list[Link] = []
        """More connections, opened in the background while every connection is busy."""
        self._growing = False
        self._grown = threading.Condition(self._lock)
        """Told when a background open ended (a connection added, or not)."""
        self._links: dict[int, Link] = {}
        """Every connection this driver opened, by the identity of its raw object, kept until :meth:`close`."""
        self._opener = Opener(uri)
        self._listener: EventListener | None = None
        self._callback_id: int | None = None
        self._closed = threading.Event()
        self.points: dict[str, Callable[[], None]] = {}
        """Fault-injection seam for tests on real libvirt: a callable here runs at the named point of a call
        (``spawn:defined`` after the domain is defined, ``spawn:started`` after it started, ``destroy:done``
        at the end of a destroy, ``remove:done`` at the end of a remove, ``receive:created`` when a move's
        destination volume exists, before the copy, ``arrive:defined`` once a move's destination domain is
        defined, before its start, ``migrate:begin`` when a move's source found its domain, before it stops
        it), e.g. to hold a call in flight as the fake driver's ``hold`` does. Empty in production."""
        _ensure_event_loop()
        self._connection("connect")

    # -- connection --------------------------------------------------------

    def _connection(self, call: str) -> Any:
        """Return a live connection (guarded: each call on it holds its lock), opening one when needed.

        The first connection is opened here, and again when it is lost
        (bounded by ``reconnect_seconds``). The caller gets the least busy
        connection whose call in flight (if any) is not stuck, one that has
        not returned for ``_STUCK_SECONDS`` (a call waiting on one hung guest's
        monitor, while libvirtd answers everything else). While no connection
        is free of a call, one more is opened on a thread of its own (up to
        ``connections`` that are not stuck, and ``_MOST_LINKS`` in all); when
        every one is stuck, the caller waits up to ``_STUCK_SECONDS`` for it
        rather than queueing behind a stuck call. Everything made through a
        connection (a domain, a volume, a stream) keeps using that connection.
        """
        with self._lock:
            waited_until: float | None = None
            while True:
                link = self._link
                if link is None or link.dead:
                    link = self._reopen(call)
                self._spare = [spare for spare in self._spare if not spare.dead and not spare.closed]
                links = [link, *self._spare]
                flowing = [one for one in links if one.stuck_for() < _STUCK_SECONDS]
                best = min(flowing, key=lambda one: one.load) if flowing else min(links, key=Link.stuck_for)
                if (best.load or not flowing) and len(flowing) < self.connections and len(links) < _MOST_LINKS:
                    self._start_growing()
                if flowing or not self._growing or self._closed.is_set():
                    return Guarded(best.raw, best)
                waited_until = waited_until or time.monotonic() + _STUCK_SECONDS
                if waited_until <= time.monotonic():
                    return Guarded(best.raw, best)
                self._grown.wait(waited_until - time.monotonic())

    def _start_growing(self) -> None:
        if not self._growing and not self._closed.is_set():
            self._growing = True
            threading.Thread(target=self._grow, name=f"libvirt-grow-{self.uri}", daemon=True).start()

    def _reopen(self, call: str) -> Link:
        """Open the first connection anew (keepalive, events); DriverUnavailable when it cannot."""
        if self._closed.is_set():
            raise DriverUnavailable(f"{call}: the driver for {self.uri} is closed", call=call)
        self._link = None
        deadline = time.monotonic() + self.reconnect_seconds
        delay = 0.1
        while True:
            try:
                raw = self._opener.open(max(1.0, deadline - time.monotonic()), call)
                break
            except libvirt.libvirtError as exc:
                if time.monotonic() + delay > deadline:
                    message = f"{call}: cannot connect to {self.uri}: {_message(exc)}"
                    raise DriverUnavailable(message, call=call) from exc
                self._closed.wait(delay)
                delay = min(delay * 2, 1.0)
        link = self._adopt_link(raw)
        self._link = link
        if self._listener is not None:
            self._subscribe(Guarded(raw, link))
        return link

    def _adopt_link(self, raw: Any) -> Link:
        """Keep a new raw connection as a link: referenced until close, its close callback and keepalive set."""
        link = Link(raw, self.uri, self.call_seconds)
        self._links[id(raw)] = link  # referenced until close: never freed under a libvirt callback
        conn = Guarded(raw, link)
        conn.registerCloseCallback(self._on_close, None)
        with suppress(libvirt.libvirtError):  # drivers without keepalive (test:///) refuse it: harmless
            # A peer silent for 5 s x 3 probes closes the connection: a dead host is noticed in seconds.
            conn.setKeepAlive(5, 3)
        return link

    def _grow(self) -> None:
        """Open one more connection (on its own thread: an open has no time limit) and add it to the spares."""
        try:
            raw = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            log.debug("libvirt_connection_not_added", uri=self.uri, error=_message(exc))
            with self._lock:
                self._growing = False
                self._grown.notify_all()
            return
        with self._lock:
            self._growing = False
            try:
                if self._closed.is_set():
                    with suppress(libvirt.libvirtError):
                        raw.close()  # nobody else has it: no call can be in flight on it
                    return
                self._spare.append(self._adopt_link(raw))
            except (libvirt.libvirtError, DriverUnavailable) as exc:
                log.debug("libvirt_connection_not_added", uri=self.uri, error=str(exc))
            finally:
                self._grown.notify_all()

    def ping(self) -> None:
        """One round trip to libvirtd (its version); DriverUnavailable when it does not answer."""
        with self._calling("ping") as conn:
            conn.getLibVersion()

    def _on_close(self, conn: Any, _reason: int, _opaque: Any) -> None:
        # On libvirt's event loop, or on a thread inside a call: mark the link dead and nothing more (no lock
        # a call may hold, no call); the next call opens a new connection.
        link = self._links.get(id(conn))
        if link is not None:
            link.dead = True

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            current, self._link, self._spare = self._link, None, []
            links, self._links = list(self._links.values()), {}
        for link in links:
            callback = self._callback_id if link is current else None

            def unregister(raw: Any, callback: int | None = callback) -> None:
                with suppress(libvirt.libvirtError):
                    if callback is not None:
                        raw.domainEventDeregisterAny(callback)
                    raw.unregisterCloseCallback()

            link.close(before=unregister)

    @contextmanager
    def _calling(self, call: str, uuid: str | None = None) -> Iterator[Any]:
        """Yield a live connection; map any libvirt error raised inside to ours."""
        conn = self._connection(call)
        try:
            yield conn
        except libvirt.libvirtError as exc:
            raise self._map_error(exc, call, uuid, conn) from exc

    def _map_error(self, exc: Any, call: str, uuid: str | None, conn: Any) -> DriverError:
        """Map a libvirt error to ours, keeping libvirt's message.

        A lost connection (the close callback fired, a link error code, or a
        dead connection) is :class:`DriverUnavailable` and drops the connection
        so the next call reconnects; a missing domain is :class:`DomainNotFound`;
        anything else is a permanent :class:`DriverError`, naming the domain's
        state re-read when the code means "wrong state".
        """
        code, text = exc.get_error_code(), _message(exc)
        if self._lost(exc, conn):
            return DriverUnavailable(f"{call}: connection to {self.uri} lost: {text}", uuid=uuid, call=call)
        if code == _ERR_NO_DOMAIN and uuid is not None:
            return _not_found(uuid, call, text)
        where = f"code {code}, error domain {exc.get_error_domain()}"
        if exc.get_error_domain() == _FROM_STORAGE:  # about a pool or a volume: never a sign of a missing domain
            if busy(exc):
                where += "; a busy answer of the storage driver (transient, see drivers.storage), still busy here"
            return DriverError(f"{call} failed in libvirt ({where}): {text}", uuid=uuid, call=call)
        if uuid is not None and code in (_ERR_OPERATION_INVALID, _ERR_INTERNAL):
            try:
                where += f"; domain is {self._state(conn.lookupByUUIDString(uuid)).name.lower()}"
            except libvirt.libvirtError as gone:
                if gone.get_error_code() == _ERR_NO_DOMAIN:
                    return _not_found(uuid, call, text)
        return DriverError(f"{call} failed in libvirt ({where}): {text}", uuid=uuid, call=call)

    def _lost(self, exc: Any, conn: Any) -> bool:
        """Return whether ``exc`` means ``conn`` is gone; if so, mark it dead so the next call reconnects."""
        link = conn._link
        lost = link.dead or (self._link is not link and link not in self._spare) or _link_error(exc) or not _alive(conn)
        if lost:
            link.dead = True
        return lost

    def _domain(self, conn: Any, uuid: str) -> Any:
        return conn.lookupByUUIDString(valid_uuid(uuid))

    def _state(self, dom: Any) -> PowerState:
        return _POWER.get(dom.state()[0], PowerState.NOSTATE)

    def _run(self, call: str, uuid: str, action: Callable[[Any], R]) -> R:
        with self._calling(call, uuid) as conn:
            return action(self._domain(conn, uuid))

    # -- the contract --------------------------------------------------------

    def spawn(self, spec: DomainSpec, *, power_on: bool = True) -> str:
        with self._calling("spawn", spec.uuid) as conn:
            dom = self._adopt(conn, spec, "spawn")
            if dom is None:
                disk = self._new_disk(conn, spec)
                try:
                    _holds(spec.attempt)  # right before the define: a worker stalled meanwhile stops here
                    dom = conn.defineXML(self._xml(spec, disk))
                except BaseException:
                    with suppress(Exception):  # this attempt's own new volume, never another's
                        self.storage.delete(conn, self.storage.disks_pool, volume_name(spec.uuid, spec.attempt))
                    raise
            self._point("spawn:defined")
            self._start(dom, spec, power_on)
            self._point("spawn:started")
            return _root_volume(dom.XMLDesc(0)) or spec.root

    def _start(self, dom: Any, spec: DomainSpec, power_on: bool) -> None:
        """Start ``dom`` when ``power_on`` and it is off, once the call's epoch is known to hold."""
        if power_on and not dom.isActive():
            _holds(spec.attempt)
            dom.create()

    def _adopt(self, conn: Any, spec: DomainSpec, call: str) -> Any | None:
        """Return the domain of ``spec`` if this call may take it (stamped anew), None if there is none.

        Taken: a domain of the call's own task (an earlier epoch's), or one
        using the disk the database records as current here. A later epoch's
        stops the call (Fenced); any other is never adopted (StaleObject).
        """
        try:
            dom = self._domain(conn, spec.uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != _ERR_NO_DOMAIN:
                raise
            return None
        xml = dom.XMLDesc(0)
        stamp, attempt = _stamp_of(xml), spec.attempt
        if attempt is not None and stamp.newer_than(attempt):
            raise Fenced(attempt.task_id, spec.uuid, attempt.epoch, stamp.epoch)
        ours = stamp.task_id == (None if attempt is None else attempt.task_id)
        if not ours and (spec.disk is None or _root_volume(xml) != spec.disk):
            raise StaleObject(
                f"{call}: the domain of {spec.uuid} on {self.uri} was made by another attempt (task"
                f" {stamp.task_id or 'unknown'}, epoch {stamp.epoch}, disk {_root_volume(xml)}): never adopted"
                " nor started",
                uuid=spec.uuid,
                call=call,
            )
        if attempt is not None and (stamp.task_id, stamp.epoch) != (attempt.task_id, attempt.epoch):
            self._restamp(dom, attempt)
        return dom

    def _restamp(self, dom: Any, attempt: Attempt) -> None:
        """Stamp ``dom`` with ``attempt`` (live and persistent): a stalled earlier attempt then leaves it alone."""
        instance = ET.fromstring(dom.XMLDesc(0)).find(f"./metadata/{{{METADATA_NS}}}instance")
        if instance is None:
            instance = ET.Element(f"{{{METADATA_NS}}}instance")
        for old in instance.findall(f"{{{METADATA_NS}}}attempt"):
            instance.remove(old)
        instance.append(_attempt_element(attempt))
        for el in instance.iter():  # libvirt puts the element in the namespace itself: it is given without one
            el.tag = el.tag.rsplit("}", 1)[-1]
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            ET.tostring(instance, encoding="unicode"),
            "lifecycle",
            METADATA_NS,
            flags,
        )

    def _point(self, name: str) -> None:
        hook = self.points.get(name)
        if hook is not None:
            hook()

    def _base(self, conn: Any, spec: DomainSpec) -> tuple[str, ImageInfo]:
        """Inspect the image on the engine's side, then make sure the host caches it; return its key."""
        image = Path(spec.image_path)
        info = inspect_image(image, spec.image_format)
        return self.storage.ensure_base(conn, self.uri, image, info), info

    def _new_disk(self, conn: Any, spec: DomainSpec, *, rescue: bool = False) -> str:
        """Create the attempt's root (or the rescue) disk volume on its cached base; return its path on the host."""
        key, info = self._base(conn, spec)
        name = self.storage.disk_names(spec.uuid)[1] if rescue else volume_name(spec.uuid, spec.attempt)
        return str(self.storage.create_disk(conn, name, key, info, spec.root_gb).path())

    def _disk(self, conn: Any, uuid: str, call: str, name: str | None = None) -> str:
        """Return the path of the root volume ``name`` (default the bare uuid); DomainNotFound when there is none."""
        vol = self.storage.volume(conn, self.storage.disks_pool, name or valid_uuid(uuid))
        if vol is None:
            raise DomainNotFound(uuid, call=call)
        return str(vol.path())

    def _current_disk(self, conn: Any, dom: Any, spec: DomainSpec, call: str) -> str:
        """Return the path of the root disk ``dom`` uses (the database's ``spec.root`` when it names none)."""
        return self._disk(conn, spec.uuid, call, _root_volume(dom.XMLDesc(0)) or spec.root)

    def _xml(self, spec: DomainSpec, disk: str, rescue: str | None = None) -> str:
        return domain_xml(spec, disk, domain_type=self.domain_type, vnc_listen=self.vnc_listen, rescue_disk=rescue)

    def destroy(self, uuid: str, *, destroy_disks: bool = True, attempt: Attempt | None = None) -> None:
        with self._calling("destroy", uuid) as conn:
            used: set[str] = set()
            try:  # gone before or during the destroy (a racing delete, an operator) is what destroy wants
                dom = self._domain(conn, uuid)
                xml = dom.XMLDesc(0)
                stamp = _stamp_of(xml)
                if attempt is None or (stamp.of_task(attempt) and not stamp.newer_than(attempt)):
                    self._undefine(dom)
                else:
                    used = {v for v in (_root_volume(xml),) if v}  # another attempt's domain: its disk stays
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != _ERR_NO_DOMAIN:
                    raise
            if destroy_disks:
                for vol in self._volumes_of(conn, uuid):
                    name = vol.name()
                    task_tag, _, epoch = (volume_tag(uuid, name) or "").rpartition("-")
                    mine = attempt is None or (
                        task_tag == attempt.task_tag and int(epoch if epoch.isdigit() else 0) <= attempt.epoch
                    )
                    if name not in used and mine:  # a later epoch's volume is never an earlier one's to delete
                        self._delete_volume(conn, name)
        self._point("destroy:done")

    def _undefine(self, dom: Any) -> None:
        """Hard-stop and undefine ``dom`` (and drop its saved memory); gone meanwhile counts as done."""
        try:
            self._hard_stop(dom)
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
            dom.undefine()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != _ERR_NO_DOMAIN:
                raise

    def _volumes_of(self, conn: Any, uuid: str) -> list[Any]:
        """Return every volume of ``uuid`` in the disks pool (root volumes of any attempt, the rescue disk)."""
        name = valid_uuid(uuid)
        return [v for v in self.storage.disks(conn) if v.name() == name or v.name().startswith(name + ".")]

    def _delete_volume(self, conn: Any, name: str) -> None:
        """Delete a volume of the disks pool (one a racing call still builds or streams is waited out by storage)."""
        try:
            self.storage.delete(conn, self.storage.disks_pool, name)
        except libvirt.libvirtError as exc:
            raise DriverError(
                f"cannot delete volume {name} on {self.uri} (code {exc.get_error_code()}): {_message(exc)}",
                call="destroy",
            ) from exc

    def objects(self, uuid: str) -> list[HostObject]:
        with self._calling("objects", uuid) as conn:
            found = []
            try:
                dom = self._domain(conn, uuid)
                xml = dom.XMLDesc(0)
                stamp = _stamp_of(xml)
                tag = None if stamp.task_id is None else stamp.task_id.replace("-", "")[:12]
                volumes = tuple(s.rsplit("/", 1)[-1] for s in _disk_sources(xml))
                found.append(HostObject("domain", dom.name(), tag, stamp.epoch, bool(dom.isActive()), volumes))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != _ERR_NO_DOMAIN:
                    raise
            for vol in self._volumes_of(conn, uuid):
                tag, _, epoch = (volume_tag(uuid, vol.name()) or "").rpartition("-")
                found.append(HostObject("volume", vol.name(), tag or None, int(epoch) if epoch.isdigit() else None))
            return found

    def remove(self, uuid: str, objects: list[HostObject]) -> list[str]:
        removed = []
        with self._calling("remove", uuid) as conn:
            used: set[str] = set()
            for obj in objects:
                if obj.kind != "domain":
                    continue
                try:
                    dom = self._domain(conn, uuid)
                    xml = dom.XMLDesc(0)
                    stamp = _stamp_of(xml)
                    tag = None if stamp.task_id is None else stamp.task_id.replace("-", "")[:12]
                    if (tag, stamp.epoch) != (obj.task_tag, obj.epoch):
                        used |= {s.rsplit("/", 1)[-1] for s in _disk_sources(xml)}  # taken meanwhile: left alone
                        continue
                    self._undefine(dom)
                    removed.append(obj.name)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != _ERR_NO_DOMAIN:
                        raise
            for obj in objects:
                if obj.kind == "volume" and obj.name not in used and not self._in_use(conn, uuid, obj.name):
                    self._delete_volume(conn, obj.name)
                    removed.append(obj.name)
        self._point("remove:done")
        return removed

    def _in_use(self, conn: Any, uuid: str, name: str) -> bool:
        """Whether the domain of ``uuid`` here uses this host's volume ``name`` (by path: pools may share names)."""
        vol = self.storage.volume(conn, self.storage.disks_pool, name)
        if vol is None:
            return False
        try:
            xml = self._domain(conn, uuid).XMLDesc(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != _ERR_NO_DOMAIN:
                raise
            return False
        return vol.path() in _disk_sources(xml)

    def _hard_stop(self, dom: Any) -> None:
        """Destroy a domain; "not running" while it is off counts as success (after a restart)."""
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (_ERR_OPERATION_INVALID, _ERR_INTERNAL) or dom.isActive():
                raise

    def power_on(self, spec: DomainSpec) -> None:
        def act(dom: Any) -> None:
            if self._state(dom) is PowerState.PAUSED:
                dom.resume()
            elif not dom.isActive():
                dom.create()

        self._run("power_on", spec.uuid, act)

    def power_off(self, uuid: str, *, timeout: float, retry_interval: float) -> bool:
        def act(dom: Any) -> bool:
            if not dom.isActive():
                return True
            if timeout > 0 and self._clean_shutdown(dom, timeout, retry_interval):
                return True
            self._hard_stop(dom)
            return False

        return self._run("power_off", uuid, act)

    def _clean_shutdown(self, dom: Any, timeout: float, retry_interval: float) -> bool:
        """Send ACPI shutdown every ``retry_interval`` s until off or ``timeout``; True if off."""
        deadline = time.monotonic() + timeout
        next_signal = 0.0
        while time.monotonic() < deadline:
            if not dom.isActive():
                return True
            if time.monotonic() >= next_signal:
                try:
                    dom.shutdown()
                except libvirt.libvirtError as exc:
                    if dom.isActive() and exc.get_error_code() not in (_ERR_OPERATION_INVALID, _ERR_INTERNAL):
                        raise
                next_signal = time.monotonic() + max(retry_interval, 0.5)
            self._closed.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        return not dom.isActive()

    def reboot(self, spec: DomainSpec, kind: RebootType) -> None:
        with self._calling("reboot", spec.uuid) as conn:
            try:
                dom = self._domain(conn, spec.uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != _ERR_NO_DOMAIN or kind is RebootType.SOFT:
                    raise
                # Lost while its disk survived: defined anew from the database and the disk, as Nova's hard reboot.
                disk = self._disk(conn, spec.uuid, "reboot", spec.root)
                _holds(spec.attempt)
                conn.defineXML(self._xml(spec, disk)).create()
                return
            if kind is RebootType.SOFT:
                if self._state(dom) is not PowerState.RUNNING:
                    raise DriverError(
                        f"soft reboot of {spec.uuid}: guest is not running", uuid=spec.uuid, call="reboot"
                    )
                if self._clean_shutdown(dom, self.soft_reboot_seconds, self.soft_reboot_seconds):
                    dom.create()
                    return
            disk = self._current_disk(conn, dom, spec, "reboot")
            self._hard_stop(dom)
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
            dom = conn.defineXML(self._xml(spec, disk))
            dom.create()

    def pause(self, uuid: str) -> None:
        self._flip("pause", uuid, PowerState.RUNNING, PowerState.PAUSED, lambda dom: dom.suspend())

    def unpause(self, uuid: str) -> None:
        self._flip("unpause", uuid, PowerState.PAUSED, PowerState.RUNNING, lambda dom: dom.resume())

    def _flip(self, call: str, uuid: str, source: PowerState, target: PowerState, act: Callable[[Any], Any]) -> None:
        """Move a domain from ``source`` to ``target``; already there is success, elsewhere an error."""

        def flip(dom: Any) -> None:
            state = self._state(dom)
            if state is target:
                return
            if state is not source:
                raise DriverError(f"cannot {call} {uuid}: domain is {state.name.lower()}", uuid=uuid, call=call)
            act(dom)

        self._run(call, uuid, flip)

    def suspend(self, uuid: str) -> None:
        def act(dom: Any) -> None:
            if dom.hasManagedSaveImage(0) and not dom.isActive():
                return
            if not dom.isActive():
                raise DriverError(f"cannot suspend {uuid}: domain is shut down", uuid=uuid, call="suspend")
            dom.managedSave(0)

        self._run("suspend", uuid, act)

    def resume(self, spec: DomainSpec) -> None:
        def act(dom: Any) -> None:
            if not dom.isActive():
                dom.create()  # restores from the managed save image when there is one

        self._run("resume", spec.uuid, act)

    def rescue(self, spec: DomainSpec) -> None:
        with self._calling("rescue", spec.uuid) as conn:
            dom = self._domain(conn, spec.uuid)
            disk = self._current_disk(conn, dom, spec, "rescue")
            rescue = self._new_disk(conn, spec, rescue=True)
            self._hard_stop(dom)
            dom = conn.defineXML(self._xml(spec, disk, rescue))
            dom.create()

    def unrescue(self, spec: DomainSpec) -> None:
        with self._calling("unrescue", spec.uuid) as conn:
            dom = self._domain(conn, spec.uuid)
            disk = self._current_disk(conn, dom, spec, "unrescue")
            self._hard_stop(dom)
            dom = conn.defineXML(self._xml(spec, disk))
            self.storage.delete(conn, self.storage.disks_pool, self.storage.disk_names(spec.uuid)[1])
            dom.create()

    def migrate_disk_and_power_off(
        self,
        uuid: str,
        *,
        timeout: float,
        retry_interval: float,
        disk: str | None = None,
        attempt: Attempt | None = None,
    ) -> str:
        call = "migrate_disk_and_power_off"
        with self._calling(call, uuid) as conn:
            try:
                dom = self._domain(conn, uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != _ERR_NO_DOMAIN:
                    raise
                dom = None  # repeated: the disk is already kept
            if dom is None:
                kept = disk or valid_uuid(uuid)
                self._disk(conn, uuid, call, kept)  # neither domain nor disk: not found
                return kept
            kept = _root_volume(dom.XMLDesc(0)) or disk or valid_uuid(uuid)
            self._point("migrate:begin")
            self._still_ours(dom, uuid, attempt)
            if dom.isActive() and not (timeout > 0 and self._clean_shutdown(dom, timeout, retry_interval)):
                self._still_ours(dom, uuid, attempt)
                self._hard_stop(dom)
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
            self._still_ours(dom, uuid, attempt)
            dom.undefine()
            self.storage.delete(conn, self.storage.disks_pool, self.storage.disk_names(uuid)[1])
        return kept

    def _still_ours(self, dom: Any, uuid: str, attempt: Attempt | None) -> None:
        """Raise Fenced when a later epoch of the task took ``dom`` or the attempt's epoch no longer holds."""
        if attempt is None:
            return
        stamp = _stamp_of(dom.XMLDesc(0))
        if stamp.newer_than(attempt):
            raise Fenced(attempt.task_id, uuid, attempt.epoch, stamp.epoch)
        attempt.holds()

    def read_disk(self, uuid: str, disk: str | None = None) -> AbstractContextManager[DiskRead]:
        return self._reading(uuid, disk or valid_uuid(uuid))

    @contextmanager
    def _reading(self, uuid: str, disk: str) -> Iterator[DiskRead]:
        with self._calling("read_disk", uuid) as conn:
            vol = self.storage.volume(conn, self.storage.disks_pool, disk)
            if vol is None:
                raise DomainNotFound(uuid, call="read_disk")
            total = int(vol.info()[2])
            reading = read_volume(conn, vol)
            segments = reading.__enter__()
        # Outside the source's own error mapping: what the reader raises while writing (the destination's
        # error) is the destination's, never read as this host's missing domain.
        try:
            yield DiskRead(segments=self._source_segments(segments, conn), total=total)
        except BaseException as exc:
            reading.__exit__(type(exc), exc, exc.__traceback__)
            raise
        reading.__exit__(None, None, None)

    def _source_segments(self, segments: Iterator[bytes | int], conn: Any) -> Iterator[bytes | int]:
        """Yield a source disk's segments; the source's own stream errors are mapped as this host's."""
        try:
            yield from segments
        except libvirt.libvirtError as exc:
            raise self._map_error(exc, "read_disk", None, conn) from exc

    def finish_migration(
        self, spec: DomainSpec, source: DiskSource, *, power_on: bool, progress: Progress | None = None
    ) -> str:
        return self._arrive("finish_migration", spec, source, power_on, progress)

    def _arrive(
        self, call: str, spec: DomainSpec, source: DiskSource, power_on: bool, progress: Progress | None
    ) -> str:
        """Take this task's domain here, or copy ``source`` into this attempt's volume and define one; start it."""
        with self._calling(call, spec.uuid) as conn:
            dom = self._adopt(conn, spec, call)
            if dom is None:
                disk = self._receive(conn, spec, source, progress, call)
                try:
                    _holds(spec.attempt)  # right before the define: a worker stalled mid-copy stops here
                    dom = conn.defineXML(self._xml(spec, disk))
                except BaseException:
                    with suppress(Exception):  # this attempt's own copy, never another's
                        self.storage.delete(conn, self.storage.disks_pool, volume_name(spec.uuid, spec.attempt))
                    raise
            self._point("arrive:defined")
            self._start(dom, spec, power_on)
            return _root_volume(dom.XMLDesc(0)) or spec.root

    def _receive(self, conn: Any, spec: DomainSpec, source: DiskSource, progress: Progress | None, call: str) -> str:
        """Copy the moved disk into this attempt's new volume here, check its digest, grow it; return its path."""
        self._base(conn, spec)  # the disk's backing store, in this host's cache before the disk arrives
        name = volume_name(spec.uuid, spec.attempt)
        self.storage.delete(conn, self.storage.disks_pool, name)  # this attempt's own partial copy at most
        vol = self.storage.pool(conn, self.storage.disks_pool).createXML(_empty_volume(name), 0)
        try:
            self._point("receive:created")
            with source() as read:
                sent = write_volume(conn, vol, read.segments, progress, read.total)
            vol = self.storage.volume(conn, self.storage.disks_pool, name)  # re-read: now a qcow2 overlay
            if vol is None:
                raise DriverError(f"the copy of {spec.uuid}'s disk vanished", uuid=spec.uuid, call=call)
            received = volume_digest(conn, vol)
            if received.hexdigest() != sent.hexdigest() or received.length != sent.length:
                raise DriverError(
                    f"disk of {spec.uuid} arrived different from what was sent "
                    f"(sent {sent.hexdigest()}, {sent.length} bytes; "
                    f"received {received.hexdigest()}, {received.length} bytes)",
                    uuid=spec.uuid,
                    call=call,
                )
            self.storage.grow(vol, spec.root_gb)
            return str(vol.path())
        except BaseException as exc:
            with suppress(Exception):  # named after this attempt: a recovered attempt's copy is never this one
                self.storage.delete(conn, self.storage.disks_pool, name)
            if isinstance(exc, libvirt.libvirtError):
                exc = self._map_error(exc, call, None, conn)
            if isinstance(exc, DriverError) and not isinstance(exc, CopyFailed):
                raise CopyFailed(f"disk copy of {spec.uuid} failed: {exc}", uuid=spec.uuid, call=call) from exc
            raise

    def snapshot(self, spec: DomainSpec, target: Path) -> None:
        # Files of this call's own (two workers of one task, an old one and its recovery, never share one),
        # readable by the engine's user alone: they hold a guest's disk.
        part, download = _scratch(target, ".part"), _scratch(target, ".download")
        try:
            with self._calling("snapshot", spec.uuid) as conn:
                disk = spec.root
                with suppress(libvirt.libvirtError):  # no domain: the disk alone is what is read
                    dom = self._domain(conn, spec.uuid)
                    if dom.isActive():
                        raise DriverError(
                            f"cannot snapshot {spec.uuid}: domain is running", uuid=spec.uuid, call="snapshot"
                        )
                    disk = _root_volume(dom.XMLDesc(0)) or disk
                vol = self.storage.volume(conn, self.storage.disks_pool, disk)
                if vol is None:
                    raise DomainNotFound(spec.uuid, call="snapshot")
                backing = _backing_key(vol.XMLDesc(0))
                with read_volume(conn, vol) as segments:
                    write_file(download, segments)
            _flatten(download, part, backing, spec)
            inspect_image(part, "qcow2")  # as any image: qcow2 through and through, no backing or data file
            part.chmod(0o600)
            part.replace(target)
        finally:
            download.unlink(missing_ok=True)
            part.unlink(missing_ok=True)

    def spawn_from_snapshot(
        self, spec: DomainSpec, snapshot: Path, *, power_on: bool = True, progress: Progress | None = None
    ) -> str:
        @contextmanager
        def delta() -> Iterator[DiskRead]:
            with self._calling("spawn_from_snapshot", spec.uuid) as conn:
                key, _ = self._base(conn, spec)
            with _difference(snapshot, spec, key) as path, _file_source(path)() as read:
                yield read

        return self._arrive("spawn_from_snapshot", spec, delta, power_on, progress)

    def confirm_migration(self, uuid: str, disk: str | None = None) -> None:
        with self._calling("confirm_migration", uuid) as conn:
            name = disk or valid_uuid(uuid)
            if self._in_use(conn, uuid, name):
                return  # a domain here uses the disk (the move was reverted): it is not kept, keep it
            self._delete_volume(conn, name)
            self.storage.delete(conn, self.storage.disks_pool, self.storage.disk_names(uuid)[1])

    def finish_revert_migration(self, spec: DomainSpec, *, power_on: bool) -> None:
        call = "finish_revert_migration"
        with self._calling(call, spec.uuid) as conn:
            disk = self._disk(conn, spec.uuid, call, spec.root)  # nothing kept: DomainNotFound
            try:
                dom = self._domain(conn, spec.uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != _ERR_NO_DOMAIN:
                    raise
                _holds(spec.attempt)
                dom = conn.defineXML(self._xml(spec, disk))
            else:
                if _root_volume(dom.XMLDesc(0)) != spec.root:
                    raise StaleObject(
                        f"{call}: the domain of {spec.uuid} on {self.uri} uses {_root_volume(dom.XMLDesc(0))}, not"
                        f" the kept disk {spec.root}: never adopted",
                        uuid=spec.uuid,
                        call=call,
                    )
                if spec.attempt is not None:
                    self._restamp(dom, spec.attempt)
            self._start(dom, spec, power_on)

    def cleanup_images(
        self, max_age_seconds: float, moving: frozenset[str] = frozenset(), keep: frozenset[str] | None = None
    ) -> list[str]:
        with self._calling("cleanup_images") as conn:
            moment = time.time()
            removed = [] if keep is None else self._orphan_disks(conn, keep | moving, max_age_seconds, moment)
            used = {_backing_key(vol.XMLDesc(0)) for vol in self.storage.disks(conn)}
            for base in self.storage.bases(conn):
                if base.name() in used or moment - _mtime(base.XMLDesc(0)) < max_age_seconds:
                    continue
                with suppress(libvirt.libvirtError):  # taken into use or removed meanwhile: leave it
                    if base.name() not in {_backing_key(v.XMLDesc(0)) for v in self.storage.disks(conn)}:
                        base.delete(0)
                        removed.append(f"{self.storage.cache_pool}/{base.name()}")
            return removed

    def _orphan_disks(self, conn: Any, keep: frozenset[str], max_age_seconds: float, moment: float) -> list[str]:
        """Delete instance disks of instances not in ``keep``, used by no domain, older than the age."""
        in_use = {src for dom in conn.listAllDomains(0) for src in _disk_sources(dom.XMLDesc(0))}
        removed = []
        for vol in self.storage.disks(conn):
            name = vol.name()
            uuid = name.split(".", 1)[0]  # <uuid>, <uuid>.<attempt tag>, <uuid>.rescue
            try:
                valid_uuid(uuid)
            except DriverError:
                continue  # not a name this driver gives: never touch what we did not make
            xml = vol.XMLDesc(0)
            if uuid in keep or vol.path() in in_use or moment - _mtime(xml) < max_age_seconds:
                continue
            with suppress(libvirt.libvirtError):  # taken or removed meanwhile
                vol.delete(0)
                removed.append(f"{self.storage.disks_pool}/{name}")
        return removed

    def drop_storage(self) -> None:
        """Delete this host's pools and every volume in them: for scratch hosts (demo, benchmarks), never a fleet's."""
        with self._calling("drop_storage") as conn:
            self.storage.drop(conn)

    def get_info(self, uuid: str) -> PowerState:
        return self._run("get_info", uuid, self._state)

    def list_instances(self) -> Listing:
        with self._calling("list_instances") as conn:
            stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
            owned: dict[str, PowerState] = {}
            foreign: list[str] = []
            for dom, values in stats:
                name = dom.name()
                if name.startswith(NAME_PREFIX):
                    owned[dom.UUIDString()] = _POWER.get(values.get("state.state", 0), PowerState.NOSTATE)
                else:
                    foreign.append(name)
        return Listing(owned=owned, foreign=tuple(sorted(foreign)))

    def get_vnc_console(self, uuid: str) -> Console:
        def act(dom: Any) -> Console:
            graphics = ET.fromstring(dom.XMLDesc(0)).find("./devices/graphics[@type='vnc']")
            port = -1 if graphics is None else int(graphics.get("port", "-1"))
            if graphics is None or port < 0:
                raise DriverError(
                    f"domain of {uuid} has no VNC port (is it running?)", uuid=uuid, call="get_vnc_console"
                )
            host = graphics.get("listen") or self.vnc_listen
            return Console(host=host, port=port)

        return self._run("get_vnc_console", uuid, act)

    def register_event_listener(self, listener: EventListener | None) -> None:
        with self._lock:
            self._listener = listener
            link = self._link
            if link is None or link.dead:
                return
            conn = Guarded(link.raw, link)
            if self._callback_id is not None:
                with suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(self._callback_id)
                self._callback_id = None
            if listener is not None:
                self._subscribe(conn)

    def _subscribe(self, conn: Any) -> None:
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )

    def _on_event(self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        transition = _EVENTS.get(event)
        listener = self._listener
        if transition is None or listener is None or not dom.name().startswith(NAME_PREFIX):
            return
        listener(LifecycleEvent(dom.UUIDString(), transition, datetime.now(UTC)))


def _flatten(download: Path, target: Path, backing: str | None, spec: DomainSpec) -> None:
    """Make a downloaded disk whole: onto the engine's copy of its base image, then into one qcow2 file."""
    if backing is not None:
        base = Path(spec.image_path).resolve()
        expected = image_key(base)
        if backing != expected:
            raise DriverError(
                f"disk of {spec.uuid} is backed by {backing}, not by its image {base} ({expected})",
                uuid=spec.uuid,
                call="snapshot",
            )
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", spec.image_format, str(download))
    qemu_img("convert", "-O", "qcow2", "-f", "qcow2", str(download), str(target))


@contextmanager
def _difference(snapshot: Path, spec: DomainSpec, key: str) -> Iterator[Path]:
    """Yield a qcow2 file holding what ``snapshot`` adds to ``spec``'s image, backed as a host disk is."""
    inspect_image(snapshot, "qcow2")
    base = Path(spec.image_path).resolve()
    delta = _scratch(snapshot, ".delta")
    try:
        qemu_img(
            "convert", "-O", "qcow2", "-f", "qcow2", "-B", str(base), "-F", spec.image_format, str(snapshot), str(delta)
        )
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", f"../_base/{key}", "-F", spec.image_format, str(delta))
        yield delta
    finally:
        delta.unlink(missing_ok=True)


def _scratch(beside: Path, suffix: str) -> Path:
    """Return a new empty file of this call's own next to ``beside`` (mode 0600)."""
    fd, name = tempfile.mkstemp(prefix=f"{beside.name}.", suffix=suffix, dir=beside.parent)
    os.close(fd)
    return Path(name)


def _file_source(path: Path) -> DiskSource:
    """Read a local file as a move reads a kept disk: sparse segments."""

    @contextmanager
    def reading() -> Iterator[DiskRead]:
        with path.open("rb") as handle:
            yield DiskRead(segments=file_segments(handle.fileno()), total=path.stat().st_size)

    return reading


def _empty_volume(name: str) -> str:
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = "0"
    ET.SubElement(ET.SubElement(vol, "target"), "format", type="raw")
    return ET.tostring(vol, encoding="unicode")


def _disk_sources(domain_xml: str) -> list[str]:
    """Return the file paths of a domain's disks."""
    return [s.get("file", "") for s in ET.fromstring(domain_xml).iterfind("./devices/disk/source")]


def _backing_key(volume_xml: str) -> str | None:
    """Return the cache key a disk volume is backed by (``../_base/<key>``), if any."""
    path = ET.fromstring(volume_xml).findtext("./backingStore/path")
    return None if path is None else path.rsplit("/", 1)[-1]


def _mtime(volume_xml: str) -> float:
    text = ET.fromstring(volume_xml).findtext("./target/timestamps/mtime")
    return float(text) if text else time.time()


def _link_error(exc: Any) -> bool:
    """Return whether a libvirt error is about the connection itself, by code and error domain."""
    code = exc.get_error_code()
    return code in _CONNECTION_CODES or (code == _ERR_SYSTEM and exc.get_error_domain() in _LINK_DOMAINS)


def _message(exc: Any) -> str:
    """Return libvirt's own message for ``exc`` (the exception text when libvirt set none)."""
    return str(exc.get_error_message() or exc)


def _not_found(uuid: str, call: str, text: str) -> DomainNotFound:
    """Return :class:`DomainNotFound` for ``uuid`` whose message also names ``call`` and libvirt's text."""
    error = DomainNotFound(uuid, call=call)
    # DomainNotFound's constructor has no room for a detail; its message is its args.
    error.args = (f"{call}: {error}: {text}",)
    return error


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except (libvirt.libvirtError, DriverUnavailable):
        return False
