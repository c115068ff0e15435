"""The fake driver's lifecycle and power calls: spawn, destroy, the host's objects, power, reboot, rescue."""

from __future__ import annotations

from lifecycle.drivers.base import Attempt, DomainSpec, HostObject, RebootType, volume_name, volume_tag
from lifecycle.drivers.fake._host import Domain, Host, P, holds, spec_values, split_tag
from lifecycle.errors import DriverError
from lifecycle.states import PowerState

__all__ = ["Calls"]


class Calls(Host):
    """The contract's calls on one domain and its own disk, with the reference semantics."""

    def spawn(self, spec: DomainSpec, *, power_on: bool = True) -> str:
        def act() -> PowerState | None:
            dom = self._adopt(spec, "spawn")
            if dom is None:
                name = volume_name(spec.uuid, spec.attempt)
                holds(spec)
                self._volumes.setdefault(name, f"image:{spec.image_path}")
                dom = Domain(spec_values(spec), int(P.SHUTDOWN), name, vnc_port=self._port())
                dom.stamp(spec.attempt)
                self._domains[spec.uuid] = dom
            if power_on and dom.power != P.RUNNING:
                holds(spec)
                dom.power = int(P.RUNNING)
                return P.RUNNING
            return None

        self._call("spawn", spec.uuid, act)
        return self._domains_disk(spec.uuid)

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
                    task_tag, epoch = split_tag(volume_tag(uuid, name))
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
                task_tag, epoch = split_tag(tag)
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
                dom = Domain(spec_values(spec), int(P.SHUTDOWN), spec.root, vnc_port=self._port())
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
