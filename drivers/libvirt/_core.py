"""What every call of the libvirt driver stands on: its connections, and the domain and disk steps calls share.

The ownership rules live here (:meth:`Core._adopt`, :meth:`Core._still_ours`):
a call adopts only a domain of its own task (or one using the disk the
database records as current), never one of another attempt (StaleObject),
and one a later epoch took stops it (Fenced); the epoch is checked
(``Attempt.holds``) right before each define, start, undefine and delete of a
long call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from lifecycle.drivers.base import Attempt, DomainSpec, Driver, EventListener, volume_name
from lifecycle.drivers.images import ImageInfo, inspect_image, valid_uuid
from lifecycle.drivers.libvirt._connections import Connections, ensure_event_loop
from lifecycle.drivers.libvirt._mapping import ERR_INTERNAL, ERR_NO_DOMAIN, ERR_OPERATION_INVALID, map_error, message
from lifecycle.drivers.libvirt._xml import METADATA_NS, disk_sources, domain_xml, restamped, root_volume, stamp_of
from lifecycle.drivers.storage import HostStorage
from lifecycle.errors import DomainNotFound, DriverError, Fenced, StaleObject

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised where libvirt-python is absent
    libvirt = None

__all__ = ["Core", "holds"]

R = TypeVar("R")


def holds(attempt: Attempt | None) -> None:
    """Check the call's attempt still holds, right before a destructive step."""
    if attempt is not None:
        attempt.holds()


class Core(Driver):
    """The state of one libvirt driver and the steps its calls share (see ``LibvirtDriver`` for the arguments)."""

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
        (:mod:`lifecycle.drivers._link`), so this many calls run on libvirtd at once."""
        self._conns = Connections(uri, size=connections, reconnect_seconds=reconnect_seconds, call_seconds=call_seconds)
        self.points: dict[str, Callable[[], None]] = {}
        """Fault-injection seam for tests on real libvirt: a callable here runs at the named point of a call
        (``spawn:defined`` after the domain is defined, ``spawn:started`` after it started, ``destroy:done``
        at the end of a destroy, ``remove:done`` at the end of a remove, ``receive:created`` when a move's
        destination volume exists, before the copy, ``arrive:defined`` once a move's destination domain is
        defined, before its start, ``migrate:begin`` when a move's source found its domain, before it stops
        it), e.g. to hold a call in flight as the fake driver's ``hold`` does. Empty in production."""
        ensure_event_loop()
        self._conns.get("connect")

    # -- connections and errors ----------------------------------------------

    def ping(self) -> None:
        """One round trip to libvirtd (its version); DriverUnavailable when it does not answer."""
        with self._calling("ping") as conn:
            conn.getLibVersion()

    def close(self) -> None:
        self._conns.close()

    def register_event_listener(self, listener: EventListener | None) -> None:
        self._conns.listen(listener)

    @contextmanager
    def _calling(self, call: str, uuid: str | None = None) -> Iterator[Any]:
        """Yield a live connection; map any libvirt error raised inside to ours."""
        conn = self._conns.get(call)
        try:
            yield conn
        except libvirt.libvirtError as exc:
            raise self._map_error(exc, call, uuid, conn) from exc

    def _map_error(self, exc: Any, call: str, uuid: str | None, conn: Any) -> DriverError:
        """Map a libvirt error to ours (:func:`~._mapping.map_error`); a lost ``conn`` is dropped."""
        return map_error(exc, call, uuid, conn, lost=self._conns.lost(exc, conn), uri=self.uri)

    def _domain(self, conn: Any, uuid: str) -> Any:
        return conn.lookupByUUIDString(valid_uuid(uuid))

    def _run(self, call: str, uuid: str, action: Callable[[Any], R]) -> R:
        with self._calling(call, uuid) as conn:
            return action(self._domain(conn, uuid))

    def _point(self, name: str) -> None:
        hook = self.points.get(name)
        if hook is not None:
            hook()

    # -- ownership -----------------------------------------------------------

    def _adopt(self, conn: Any, spec: DomainSpec, call: str) -> Any | None:
        """Return the domain of ``spec`` if this call may take it (stamped anew), None if there is none.

        Taken: a domain of the call's own task (an earlier epoch's), or one
        using the disk the database records as current here. A later epoch's
        stops the call (Fenced); any other is never adopted (StaleObject).
        """
        try:
            dom = self._domain(conn, spec.uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != ERR_NO_DOMAIN:
                raise
            return None
        xml = dom.XMLDesc(0)
        stamp, attempt = stamp_of(xml), spec.attempt
        if attempt is not None and stamp.newer_than(attempt):
            raise Fenced(attempt.task_id, spec.uuid, attempt.epoch, stamp.epoch)
        ours = stamp.task_id == (None if attempt is None else attempt.task_id)
        if not ours and (spec.disk is None or root_volume(xml) != spec.disk):
            raise StaleObject(
                f"{call}: the domain of {spec.uuid} on {self.uri} was made by another attempt (task"
                f" {stamp.task_id or 'unknown'}, epoch {stamp.epoch}, disk {root_volume(xml)}): never adopted"
                " nor started",
                uuid=spec.uuid,
                call=call,
            )
        if attempt is not None and (stamp.task_id, stamp.epoch) != (attempt.task_id, attempt.epoch):
            self._restamp(dom, attempt)
        return dom

    def _restamp(self, dom: Any, attempt: Attempt) -> None:
        """Stamp ``dom`` with ``attempt`` (live and persistent): a stalled earlier attempt then leaves it alone."""
        metadata = restamped(dom.XMLDesc(0), attempt)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata, "lifecycle", METADATA_NS, flags)

    def _still_ours(self, dom: Any, uuid: str, attempt: Attempt | None) -> None:
        """Raise Fenced when a later epoch of the task took ``dom`` or the attempt's epoch no longer holds."""
        if attempt is None:
            return
        stamp = stamp_of(dom.XMLDesc(0))
        if stamp.newer_than(attempt):
            raise Fenced(attempt.task_id, uuid, attempt.epoch, stamp.epoch)
        attempt.holds()

    # -- domain steps --------------------------------------------------------

    def _xml(self, spec: DomainSpec, disk: str, rescue: str | None = None) -> str:
        return domain_xml(spec, disk, domain_type=self.domain_type, vnc_listen=self.vnc_listen, rescue_disk=rescue)

    def _start(self, dom: Any, spec: DomainSpec, power_on: bool) -> None:
        """Start ``dom`` when ``power_on`` and it is off, once the call's epoch is known to hold."""
        if power_on and not dom.isActive():
            holds(spec.attempt)
            dom.create()

    def _hard_stop(self, dom: Any) -> None:
        """Destroy a domain; "not running" while it is off counts as success (after a restart)."""
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (ERR_OPERATION_INVALID, ERR_INTERNAL) or dom.isActive():
                raise

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
                    if dom.isActive() and exc.get_error_code() not in (ERR_OPERATION_INVALID, ERR_INTERNAL):
                        raise
                next_signal = time.monotonic() + max(retry_interval, 0.5)
            self._conns.closed.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        return not dom.isActive()

    def _undefine(self, dom: Any) -> None:
        """Hard-stop and undefine ``dom`` (and drop its saved memory); gone meanwhile counts as done."""
        try:
            self._hard_stop(dom)
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
            dom.undefine()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != ERR_NO_DOMAIN:
                raise

    # -- disk steps ----------------------------------------------------------

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
        return self._disk(conn, spec.uuid, call, root_volume(dom.XMLDesc(0)) or spec.root)

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
                f"cannot delete volume {name} on {self.uri} (code {exc.get_error_code()}): {message(exc)}",
                call="destroy",
            ) from exc

    def _in_use(self, conn: Any, uuid: str, name: str) -> bool:
        """Whether the domain of ``uuid`` here uses this host's volume ``name`` (by path: pools may share names)."""
        vol = self.storage.volume(conn, self.storage.disks_pool, name)
        if vol is None:
            return False
        try:
            xml = self._domain(conn, uuid).XMLDesc(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != ERR_NO_DOMAIN:
                raise
            return False
        return vol.path() in disk_sources(xml)
