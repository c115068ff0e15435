"""The libvirt driver's lifecycle and power calls: spawn, destroy, the host's objects, power, reboot, rescue, reads."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import Any

from lifecycle.drivers.base import (
    Attempt,
    Console,
    DomainSpec,
    HostObject,
    Listing,
    RebootType,
    volume_name,
    volume_tag,
)
from lifecycle.drivers.libvirt._core import Core, holds
from lifecycle.drivers.libvirt._mapping import ERR_NO_DOMAIN, POWER, power_of
from lifecycle.drivers.libvirt._xml import NAME_PREFIX, disk_sources, root_volume, stamp_of, vnc_of
from lifecycle.errors import DriverError
from lifecycle.states import PowerState

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised where libvirt-python is absent
    libvirt = None

__all__ = ["LifecycleCalls"]


class LifecycleCalls(Core):
    """The contract's calls on one domain and its own disk: it comes, changes power, and goes."""

    def spawn(self, spec: DomainSpec, *, power_on: bool = True) -> str:
        with self._calling("spawn", spec.uuid) as conn:
            dom = self._adopt(conn, spec, "spawn")
            if dom is None:
                disk = self._new_disk(conn, spec)
                try:
                    holds(spec.attempt)  # right before the define: a worker stalled meanwhile stops here
                    dom = conn.defineXML(self._xml(spec, disk))
                except BaseException:
                    with suppress(Exception):  # this attempt's own new volume, never another's
                        self.storage.delete(conn, self.storage.disks_pool, volume_name(spec.uuid, spec.attempt))
                    raise
            self._point("spawn:defined")
            self._start(dom, spec, power_on)
            self._point("spawn:started")
            return root_volume(dom.XMLDesc(0)) or spec.root

    def destroy(self, uuid: str, *, destroy_disks: bool = True, attempt: Attempt | None = None) -> None:
        with self._calling("destroy", uuid) as conn:
            used: set[str] = set()
            try:  # gone before or during the destroy (a racing delete, an operator) is what destroy wants
                dom = self._domain(conn, uuid)
                xml = dom.XMLDesc(0)
                stamp = stamp_of(xml)
                if attempt is None or (stamp.of_task(attempt) and not stamp.newer_than(attempt)):
                    self._undefine(dom)
                else:
                    used = {v for v in (root_volume(xml),) if v}  # another attempt's domain: its disk stays
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != ERR_NO_DOMAIN:
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

    def objects(self, uuid: str) -> list[HostObject]:
        with self._calling("objects", uuid) as conn:
            found = []
            try:
                dom = self._domain(conn, uuid)
                xml = dom.XMLDesc(0)
                stamp = stamp_of(xml)
                tag = None if stamp.task_id is None else stamp.task_id.replace("-", "")[:12]
                volumes = tuple(s.rsplit("/", 1)[-1] for s in disk_sources(xml))
                found.append(HostObject("domain", dom.name(), tag, stamp.epoch, bool(dom.isActive()), volumes))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != ERR_NO_DOMAIN:
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
                    stamp = stamp_of(xml)
                    tag = None if stamp.task_id is None else stamp.task_id.replace("-", "")[:12]
                    if (tag, stamp.epoch) != (obj.task_tag, obj.epoch):
                        used |= {s.rsplit("/", 1)[-1] for s in disk_sources(xml)}  # taken meanwhile: left alone
                        continue
                    self._undefine(dom)
                    removed.append(obj.name)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != ERR_NO_DOMAIN:
                        raise
            for obj in objects:
                if obj.kind == "volume" and obj.name not in used and not self._in_use(conn, uuid, obj.name):
                    self._delete_volume(conn, obj.name)
                    removed.append(obj.name)
        self._point("remove:done")
        return removed

    def power_on(self, spec: DomainSpec) -> None:
        def act(dom: Any) -> None:
            if power_of(dom) is PowerState.PAUSED:
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

    def reboot(self, spec: DomainSpec, kind: RebootType) -> None:
        with self._calling("reboot", spec.uuid) as conn:
            try:
                dom = self._domain(conn, spec.uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != ERR_NO_DOMAIN or kind is RebootType.SOFT:
                    raise
                # Lost while its disk survived: defined anew from the database and the disk, as Nova's hard reboot.
                disk = self._disk(conn, spec.uuid, "reboot", spec.root)
                holds(spec.attempt)
                conn.defineXML(self._xml(spec, disk)).create()
                return
            if kind is RebootType.SOFT:
                if power_of(dom) is not PowerState.RUNNING:
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
            state = power_of(dom)
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

    def get_info(self, uuid: str) -> PowerState:
        return self._run("get_info", uuid, power_of)

    def list_instances(self) -> Listing:
        with self._calling("list_instances") as conn:
            stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
            owned: dict[str, PowerState] = {}
            foreign: list[str] = []
            for dom, values in stats:
                name = dom.name()
                if name.startswith(NAME_PREFIX):
                    owned[dom.UUIDString()] = POWER.get(values.get("state.state", 0), PowerState.NOSTATE)
                else:
                    foreign.append(name)
        return Listing(owned=owned, foreign=tuple(sorted(foreign)))

    def get_vnc_console(self, uuid: str) -> Console:
        def act(dom: Any) -> Console:
            listen, port = vnc_of(dom.XMLDesc(0))
            if port < 0:
                raise DriverError(
                    f"domain of {uuid} has no VNC port (is it running?)", uuid=uuid, call="get_vnc_console"
                )
            return Console(host=listen or self.vnc_listen, port=port)

        return self._run("get_vnc_console", uuid, act)
