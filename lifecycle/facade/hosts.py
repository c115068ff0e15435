"""``engine.hosts``: register, read, fence, evacuate, heartbeat and sync the hosts instances live on."""

from __future__ import annotations

import builtins

from lifecycle import console, drivers, evacuation, validation
from lifecycle.context import Services
from lifecycle.drivers.base import Driver
from lifecycle.errors import InvalidInput
from lifecycle.facade.drivers import DriverCache
from lifecycle.logs import get_logger
from lifecycle.records import Host
from lifecycle.sweep import PassSummary, sweep_host

__all__ = ["Hosts"]

log = get_logger(__name__)


class Hosts:
    """The hosts of one engine (``engine.hosts``)."""

    def __init__(self, services: Services, drivers: DriverCache) -> None:
        self._services = services
        self._drivers = drivers

    def add(
        self,
        name: str,
        driver_uri: str,
        instances_path: str = "/var/lib/lifecycle/instances",
        *,
        availability_zone: str = "nova",
        vcpus: int | None = None,
        memory_mb: int | None = None,
        disk_gb: int | None = None,
        capabilities: dict[str, str] | None = None,
        hypervisor_type: str = "qemu",
        architecture: str = "x86_64",
        console_address: str | None = None,
    ) -> Host:
        """Register a host reached through ``driver_uri``; resources None are not tracked.

        The URI is checked, not opened (see :func:`lifecycle.drivers.validate_uri`): a
        host may be registered before its hypervisor answers. A ``qemu`` URI
        another host already uses is refused: one libvirtd is one host. ``console_address``
        is the host's management address, where its guests' VNC servers listen
        and console tokens lead (default: the engine's ``vnc_listen``); a remote
        host (:func:`lifecycle.console.requires_console_address`) must have one, and not one
        leading back to this machine (:func:`lifecycle.console.check_console_address`).
        """
        store = self._services.store
        validation.name("host", name)
        if not isinstance(driver_uri, str):
            raise InvalidInput(f"driver URI must be a string, got {type(driver_uri).__name__}")
        uri = drivers.validate_uri(driver_uri)
        address = validation.host_address("console address", console_address)
        if address is not None:
            console.check_console_address(uri, address)
        elif console.requires_console_address(uri):
            raise InvalidInput(
                f"host {name} ({uri}) is on another machine: give its management address with console_address"
                " (lifecycle host add --console-address ADDR), where its guests' VNC servers listen; without it"
                " console tokens would lead to a port on the console proxy's own machine"
            )
        identity = drivers.hypervisor_identity(uri)
        if identity is not None:
            for other in store.hosts.list():
                if drivers.hypervisor_identity(other.driver_uri) == identity and other.name != name:
                    raise InvalidInput(
                        f"{uri} names the libvirtd of host {other.name} ({other.driver_uri}): one libvirtd is one host "
                        "(domain names and storage pools belong to the libvirtd, not to an instances path)"
                    )
        if not isinstance(instances_path, str) or not instances_path.startswith("/"):
            raise InvalidInput(f"instances path must be an absolute path on the host, got {instances_path!r}")
        validation.name("instances path", instances_path)
        for label, value in (("vcpus", vcpus), ("memory_mb", memory_mb), ("disk_gb", disk_gb)):
            if value is not None:
                validation.count(f"host {label}", value)
        host = store.hosts.add(
            name,
            uri,
            instances_path,
            availability_zone=validation.name("availability zone", availability_zone),
            vcpus=vcpus,
            memory_mb=memory_mb,
            disk_gb=disk_gb,
            capabilities=validation.labels("capabilities", capabilities),
            hypervisor_type=validation.short_name("hypervisor type", hypervisor_type, 64),
            architecture=validation.short_name("architecture", architecture, 32),
            console_address=address,
        )
        self._drivers.added(host)
        return host

    def get(self, name: str) -> Host:
        """Return one host; :class:`HostNotFound` (naming the known ones) otherwise."""
        return self._services.store.hosts.get(validation.name("host", name))

    def list(self) -> builtins.list[Host]:
        """Return every registered host."""
        return self._services.store.hosts.list()

    def remove(self, name: str, *, force: bool = False) -> builtins.list[str]:
        """Forget a host; refused (:class:`HostInUse`) while instances live there, unless ``force``.

        Forced, each idle instance still there goes to error with no host (a
        delete of it is then a database-only delete) and the list of those
        uuids is returned; the guests are not touched. Instances with a
        running task or an open move are never orphaned.
        """
        if not isinstance(force, bool):
            raise InvalidInput(f"force must be True or False, got {force!r}")
        orphaned = self._services.store.hosts.remove(validation.name("host", name), force=force)
        self._drivers.forget(name)
        log.info("host_removed", host=name, force=force, orphaned=len(orphaned))
        return orphaned

    def set_enabled(self, name: str, enabled: bool) -> Host:
        """Enable or disable a host for scheduling (its instances keep running and are still synced)."""
        if not isinstance(enabled, bool):
            raise InvalidInput(f"enabled must be True or False, got {enabled!r}")
        return self._services.store.hosts.update(validation.name("host", name), enabled=enabled)

    def fence(self, name: str, *, reason: str, actor: str = "api") -> Host:
        """Declare a host dead: the scheduler never places there, and once it is down its instances may be evacuated."""
        return evacuation.fence(self._services, name, reason=reason, actor=actor)

    def unfence(self, name: str, *, actor: str = "api") -> Host:
        """Lift a host's fence (after its evacuated copies were destroyed, say)."""
        return evacuation.unfence(self._services, name, actor=actor)

    def evacuate(self, name: str, *, actor: str = "api") -> builtins.list[evacuation.EvacuationResult]:
        """Evacuate every instance of a down, fenced host (see :meth:`Engine.evacuate`); one result per instance."""
        return evacuation.evacuate_host(self._services, name, actor=actor)

    def destroy_evacuated(self, name: str) -> builtins.list[str]:
        """Destroy (never start) the copies a returning host still holds of instances evacuated away from it."""
        return evacuation.destroy_evacuated(self._services, name)

    def heartbeat(self, name: str, metrics: dict[str, float] | None = None) -> Host:
        """Record that a daemon owning the host is alive (and its metrics); the scheduler needs it.

        A host still holding old copies of instances evacuated away from it
        has them destroyed first (:func:`evacuation.clear_for_heartbeat`); when
        its hypervisor cannot do that, :class:`EvacuatedCopiesPending` names them
        and nothing is written.
        """
        name = self.get(name).name  # an unknown one is named with the known ones
        values: dict[str, object] = {}
        if metrics is not None:
            values["metrics"] = validation.metrics(metrics)  # refused here, not at the next create
        evacuation.clear_for_heartbeat(self._services, name)
        return self._services.store.hosts.update(name, last_heartbeat=self._services.clock.now(), **values)

    def driver(self, name: str) -> Driver:
        """Return the (cached) driver of a host; opening one that hangs blocks only its own callers."""
        return self._drivers.get(name)

    def sync(self, name: str | None = None) -> builtins.list[PassSummary]:
        """Run one power-sync pass over host ``name`` (default: every host, disabled ones too).

        A host whose pass cannot run (its hypervisor unreachable, say) gets a
        summary with ``error`` set; the other hosts are synced all the same.
        An in-memory fake host another process added refuses the whole call
        first (:class:`InMemoryHostElsewhere`): this process would see it empty.
        """
        hosts = [self.get(name)] if name is not None else self.list()
        for host in hosts:
            self._drivers.check_here(host)
        return [self._sync_one(host.name) for host in hosts]

    def _sync_one(self, name: str) -> PassSummary:
        s = self._services.settings
        try:
            summary = sweep_host(self._services, name, s.sync_policy, chunk=s.sync_chunk_size)
        except Exception as exc:  # per host: one unreachable hypervisor must not hide the others
            log.warning("sync_pass_failed", host=name, error=f"{type(exc).__name__}: {exc}")
            summary = PassSummary(name, error=f"{type(exc).__name__}: {exc}")
        self._services.metrics.observe_pass(summary)
        return summary
