"""The facade embedders call: register hosts and images, run operations, read state.

Every operation goes the same way: validate the arguments, check the
guard from the operations table, start a task with a compare-and-swap, run its
steps, and end it. ``wait=True`` (the default) runs the task in the caller's
thread and returns it finished; ``wait=False`` returns it running and runs it
on the engine's executor.
"""

from __future__ import annotations

import builtins
import ipaddress
import re
import threading
import uuid as uuidlib
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import structlog

import drivers
import lifecycle.feed as feed
import lifecycle.webhooks as webhooks
from drivers.base import Driver
from lifecycle import console, duties, evacuation, graph, snapshots, validation
from lifecycle.audit import AuditEntry
from lifecycle.clock import Clock, SystemClock
from lifecycle.config import Settings
from lifecycle.context import Services
from lifecycle.errors import InvalidInput
from lifecycle.graph import Op
from lifecycle.metrics import Metrics
from lifecycle.records import Cause, Flavor, Host, Image, Instance, Migration, Task, TaskStep
from lifecycle.recovery import Recovered, recover_tasks
from lifecycle.resize_window import WindowResult, poll_unconfirmed_resizes
from lifecycle.runner import Runner
from lifecycle.states import VmState
from lifecycle.store import DEFAULT_DB_URL, Store, check_schema
from lifecycle.sweep import PassSummary, sweep_host

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["CallOptions", "Engine"]

log = structlog.get_logger(__name__)

DriverFactory = Callable[[Host], Driver]


def _labels(kind: str, value: object) -> dict[str, str]:
    """Validate a mapping of names to short strings (capabilities, image properties)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{kind} must be a mapping of strings, got {type(value).__name__}")
    for key, text in value.items():
        validation.name(f"{kind} key", key)
        if not isinstance(text, str) or len(text) > 255 or validation.unsafe_character(text):
            raise InvalidInput(f"{kind} {key!r} must be a printable string of at most 255 characters, got {text!r}")
    return dict(value)


def _short(kind: str, value: object, limit: int) -> str:
    text = validation.name(kind, value)
    if len(text) > limit:
        raise InvalidInput(f"{kind} {text[:40]!r}... is {len(text)} characters: at most {limit}")
    return text


def _console_address(value: object) -> str | None:
    if value is None:
        return None
    text = _short("console address", value, 255)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?", text):
            raise InvalidInput(f"console address {text!r} is neither an IP address nor a host name") from None
    return text


def _optional_name(kind: str, value: object) -> str | None:
    return None if value is None else validation.name(kind, value)


def _to(host: str | None) -> dict[str, Any]:
    """Return the parameters of an operation sent to ``host``, or where the scheduler puts it (None)."""
    return {} if host is None else {"host": host}


class CallOptions(TypedDict, total=False):
    """The keyword arguments every instance operation takes beside its own, typed (see :meth:`Engine.run`)."""

    request_id: str | None
    idempotency_key: str | None
    actor: str
    cause: Cause
    wait: bool
    override_lock: bool


class Engine:
    """The lifecycle engine over one database.

    ``driver_factory`` opens the driver of a host (by default from its URI);
    drivers are opened once per host and kept. ``owner`` names this engine in
    task leases (default: a fresh uuid per engine). ``clock`` is what time it
    is for every policy time of the engine, its store, services and daemon
    (default: :class:`lifecycle.clock.SystemClock`; tests give a
    :class:`lifecycle.clock.ManualClock` and move it).
    """

    def __init__(
        self,
        db_url: str = DEFAULT_DB_URL,
        *,
        settings: Settings | None = None,
        driver_factory: DriverFactory | None = None,
        owner: str | None = None,
        metrics_registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        if settings is not None and not isinstance(settings, Settings):
            raise InvalidInput(f"settings must be a lifecycle.Settings, got {type(settings).__name__}")
        if owner is not None:
            validation.name("owner", owner)
        self.settings = settings or Settings()
        self.clock: Clock = clock or SystemClock()
        """What time it is for the lifecycle's policy: the store, the services and the daemon read it."""
        self.store = Store(db_url, lease_seconds=self.settings.lease_seconds, clock=self.clock)
        check_schema(self.store.engine)
        self.owner = owner or f"engine-{uuidlib.uuid4()}"
        self._factory = driver_factory or self._connect
        self._drivers: dict[str, Driver] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.runner = Runner(self.store, self.settings, self.driver, self.owner)
        """Starts tasks and runs their workers (guards, idempotency, preemption, pool, leases)."""
        self.metrics = Metrics(self.store, self.settings, metrics_registry)
        """Prometheus metrics; ``metrics.registry`` is what to serve (a new registry unless one is given)."""
        self.services = Services(self.store, self.settings, self.runner, self.metrics, self.driver, self.clock)
        """What the engine gives its services (sync, duties, evacuation, the resize window, webhooks): not itself."""

    def close(self) -> None:
        """Wait for background tasks, stop the heartbeat, close drivers and the database."""
        self.runner.close()
        for driver in self._drivers.values():
            driver.close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- hosts, images, reads -------------------------------------------------

    def add_host(
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

        The URI is checked, not opened (see :func:`drivers.validate_uri`): a
        host may be registered before its hypervisor answers. A ``qemu`` URI
        another host already uses is refused: one libvirtd is one host. ``console_address``
        is the host's management address, where its guests' VNC servers listen
        and console tokens lead (default: the engine's ``vnc_listen``); a remote
        host (:func:`lifecycle.console.requires_console_address`) must have one, and not one
        leading back to this machine (:func:`lifecycle.console.check_console_address`).
        """
        validation.name("host", name)
        if not isinstance(driver_uri, str):
            raise InvalidInput(f"driver URI must be a string, got {type(driver_uri).__name__}")
        uri = drivers.validate_uri(driver_uri)
        address = _console_address(console_address)
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
            for other in self.store.list_hosts():
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
        return self.store.add_host(
            name,
            uri,
            instances_path,
            availability_zone=validation.name("availability zone", availability_zone),
            vcpus=vcpus,
            memory_mb=memory_mb,
            disk_gb=disk_gb,
            capabilities=_labels("capabilities", capabilities),
            hypervisor_type=_short("hypervisor type", hypervisor_type, 64),
            architecture=_short("architecture", architecture, 32),
            console_address=address,
        )

    def host(self, name: str) -> Host:
        """Return one host."""
        return self.store.get_host(validation.name("host", name))

    def remove_host(self, name: str, *, force: bool = False) -> builtins.list[str]:
        """Forget a host; refused (:class:`HostInUse`) while instances live there, unless ``force``.

        Forced, each idle instance still there goes to error with no host (a
        delete of it is then a database-only delete) and the list of those
        uuids is returned; the guests are not touched. Instances with a
        running task or an open move are never orphaned.
        """
        if not isinstance(force, bool):
            raise InvalidInput(f"force must be True or False, got {force!r}")
        orphaned = self.store.remove_host(validation.name("host", name), force=force)
        with self._lock:
            driver = self._drivers.pop(name, None)
        if driver is not None:
            driver.close()
        log.info("host_removed", host=name, force=force, orphaned=len(orphaned))
        return orphaned

    def set_host_enabled(self, name: str, enabled: bool) -> Host:
        """Enable or disable a host for scheduling (its instances keep running and are still synced)."""
        if not isinstance(enabled, bool):
            raise InvalidInput(f"enabled must be True or False, got {enabled!r}")
        return self.store.update_host(validation.name("host", name), enabled=enabled)

    def fence_host(self, name: str, *, reason: str, actor: str = "api") -> Host:
        """Declare a host dead: the scheduler never places there, and once it is down its instances may be evacuated."""
        return evacuation.fence(self.services, name, reason=reason, actor=actor)

    def unfence_host(self, name: str, *, actor: str = "api") -> Host:
        """Lift a host's fence (after its evacuated copies were destroyed, say)."""
        return evacuation.unfence(self.services, name, actor=actor)

    def evacuate_host(self, name: str, *, actor: str = "api") -> builtins.list[evacuation.EvacuationResult]:
        """Evacuate every instance of a down, fenced host (see :meth:`evacuate`); one result per instance."""
        return evacuation.evacuate_host(self.services, name, actor=actor)

    def destroy_evacuated(self, name: str) -> builtins.list[str]:
        """Destroy (never start) the copies a returning host still holds of instances evacuated away from it."""
        return evacuation.destroy_evacuated(self.services, name)

    def heartbeat(self, name: str, metrics: dict[str, float] | None = None) -> Host:
        """Record that a daemon owning the host is alive (and its metrics); the scheduler needs it.

        A host still holding old copies of instances evacuated away from it
        has them destroyed first (:func:`evacuation.clear_for_heartbeat`); when
        its hypervisor cannot do that, :class:`EvacuatedCopiesPending` names them
        and nothing is written.
        """
        name = self.host(validation.name("host", name)).name  # an unknown one is named with the known ones
        values: dict[str, object] = {}
        if metrics is not None:
            values["metrics"] = validation.metrics(metrics)  # refused here, not at the next create
        evacuation.clear_for_heartbeat(self.services, name)
        return self.store.update_host(name, last_heartbeat=self.clock.now(), **values)

    def hosts(self) -> builtins.list[Host]:
        """Return every registered host."""
        return self.store.list_hosts()

    def add_image(
        self,
        name: str,
        path: str,
        disk_format: str = "qcow2",
        min_disk_gb: int = 0,
        properties: dict[str, str] | None = None,
    ) -> Image:
        """Register an image file instances can boot from (properties: architecture, hypervisor_type).

        ``path`` must be an absolute path to an existing regular file here.
        """
        if disk_format not in ("qcow2", "raw"):
            raise InvalidInput(f"invalid disk format {disk_format!r}: expected qcow2 or raw")
        validation.name("image", name)
        if name.startswith(snapshots.PREFIX):
            raise InvalidInput(
                f"image names starting with {snapshots.PREFIX!r} are kept for shelve snapshots: {name!r}"
            )
        path = validation.image_path(path)
        validation.count("image min_disk_gb", min_disk_gb)
        return self.store.add_image(name, path, disk_format, min_disk_gb, _labels("image properties", properties))

    def images(self) -> builtins.list[Image]:
        """Return every registered image."""
        return self.store.list_images()

    def get(self, uuid: str) -> Instance:
        """Return the instance (deleted ones too); :class:`InstanceNotFound` otherwise."""
        return self.store.get_instance(validation.uuid(uuid))

    def list(self, host: str | None = None, *, include_deleted: bool = False) -> builtins.list[Instance]:
        """Return instances, optionally of one host."""
        return self.store.list_instances(_optional_name("host", host), include_deleted=include_deleted)

    def task(self, task_id: str) -> Task:
        """Return a task by id; :class:`TaskNotFound` otherwise."""
        return self.store.get_task(validation.uuid(task_id, "task"))

    def tasks(self, uuid: str) -> builtins.list[Task]:
        """Return every task of an instance, oldest first; :class:`InstanceNotFound` for an unknown one."""
        return self.store.tasks_of(self.get(uuid).uuid)

    def migrations(self, host: str | None = None) -> builtins.list[Migration]:
        """Return cold migrations and resizes, newest first, optionally those from or to ``host``."""
        if host is not None:
            self.host(validation.name("host", host))
        return self.store.list_migrations(host)

    def migration(self, migration_id: str) -> Migration:
        """Return one migration by id; :class:`MigrationNotFound` otherwise."""
        return self.store.get_migration(validation.uuid(migration_id, "migration"))

    def steps(self, task_id: str) -> builtins.list[TaskStep]:
        """Return a task's step log."""
        return self.store.steps(self.task(task_id).id)

    def history(self, uuid: str) -> builtins.list[AuditEntry]:
        """Return an instance's audit log, oldest first."""
        return self.store.history(self.get(uuid).uuid)

    def driver(self, host_name: str) -> Driver:
        """Return the (cached) driver of a host.

        Opened under a lock of that host alone: connecting to a hypervisor that
        does not answer blocks callers for that host, never for the others.
        """
        validation.name("host", host_name)
        with self._lock:
            driver = self._drivers.get(host_name)
            if driver is not None:
                return driver
            opening = self._opening.setdefault(host_name, threading.Lock())
        with opening:
            with self._lock:
                driver = self._drivers.get(host_name)
            if driver is None:
                driver = self._factory(self.store.get_host(host_name))
                with self._lock:
                    self._drivers[host_name] = driver
            return driver

    def get_vnc_console(self, uuid: str) -> console.ConsoleAccess:
        """Issue a console token for an instance and return its access URL."""
        s = self.settings
        return console.issue(self.store, self.driver, self.get(uuid), s.console_base_url, s.console_token_ttl)

    def poll_unconfirmed_resizes(self) -> builtins.list[WindowResult]:
        """Confirm (or revert) moves finished longer ago than ``resize_confirm_window``."""
        results = poll_unconfirmed_resizes(self.services)
        self.metrics.observe_window(results)
        return results

    def recover(self, *, force: bool = False, owner: str | None = None) -> builtins.list[Recovered]:
        """Take over and finish every task whose owner's lease has run out.

        Each is resumed forward or rolled back per :func:`lifecycle.recovery.plan`;
        afterwards no recovered instance has a task in flight. A task whose
        lease is live belongs to a worker that may still be running: it is
        taken only with ``force`` and only when it carries ``owner``, by
        default this engine's own name (a restarted engine that knows its
        predecessor is dead). Taken tasks are this engine's from then on. The
        old worker, if it lives after all, is fenced: it stops before its next
        driver call, and a call in flight touches only its own attempt's objects.
        """
        if owner is not None:
            validation.name("owner", owner)
        results = recover_tasks(self.runner, force=force, of_owner=owner)
        self.metrics.observe_recovery(results)
        return results

    def waiting_for_lease(self) -> builtins.list[Task]:
        """Return the running tasks ``recover`` leaves alone because their lease is still live."""
        return self.store.live_tasks()

    @property
    def active_tasks(self) -> set[str]:
        """Ids of the tasks this engine's workers are running now."""
        return self.runner.active

    def wait_idle(self) -> None:
        """Block until every task this engine started with ``wait=False`` has ended."""
        self.runner.wait_idle()

    def sync(self, host: str | None = None) -> builtins.list[PassSummary]:
        """Run one power-sync pass over ``host`` (default: every host, disabled ones too).

        A host whose pass cannot run (its hypervisor unreachable, say) gets a
        summary with ``error`` set; the other hosts are synced all the same.
        """
        names = [self.host(host).name] if host is not None else [h.name for h in self.hosts()]
        return [self._sync_one(name) for name in names]

    def _sync_one(self, name: str) -> PassSummary:
        s = self.settings
        try:
            summary = sweep_host(self.services, name, s.sync_policy, chunk=s.sync_chunk_size)
        except Exception as exc:  # per host: one unreachable hypervisor must not hide the others
            log.warning("sync_pass_failed", host=name, error=f"{type(exc).__name__}: {exc}")
            summary = PassSummary(name, error=f"{type(exc).__name__}: {exc}")
        self.metrics.observe_pass(summary)
        return summary

    def clean_image_cache(self, host: str, max_age_seconds: float | None = None) -> builtins.list[str]:
        """Remove a host's unused cached base images older than the age, and its orphaned disks; return them.

        An orphaned disk is one of an instance the database places neither on
        this host nor in a move touching it, used by no domain: what a copy
        or a delete left while the host did not answer.
        """
        age = self.settings.image_cache_max_age if max_age_seconds is None else max_age_seconds
        age = validation.seconds("image cache max age", age)
        self.host(host)
        moving = self.store.moving_instances(graph.MOVE_TASK_STATES)
        keep = frozenset(i.uuid for i in self.store.list_instances(host)) | frozenset(
            m.instance_uuid for m in self.store.migrations_touching(host)
        )
        return self.driver(host).cleanup_images(age, moving, keep)

    def check_console_token(self, token: str) -> console.ConsoleConnection | None:
        """Return where to connect for a console token while valid and its guest still serves it, else None."""
        return console.check(self.store, token, self.driver)

    # -- operations -------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        flavor: Flavor,
        image: str,
        host: str | None = None,
        availability_zone: str | None = None,
        uuid: str | None = None,
        request_id: str | None = None,
        actor: str = "api",
        wait: bool = True,
    ) -> Task:
        """Build a new instance, on ``host`` or where the scheduler puts it; returns the create task.

        A spawn that fails is rescheduled on another host up to
        ``scheduler.max_attempts`` times (not when a host was named); the
        instance then goes to error with every attempt in its audit log.
        """
        if not isinstance(flavor, Flavor):
            raise InvalidInput(f"flavor must be a Flavor, got {type(flavor).__name__}")
        params: dict[str, Any] = {"name": name, "flavor": flavor.as_dict(), "image": image}
        if host is not None:
            params["host"] = host
        if availability_zone is not None:
            params["availability_zone"] = availability_zone
        new = validation.uuid(uuid) if uuid is not None else str(uuidlib.uuid4())
        return self.runner.start(Op.CREATE, new, params=params, request_id=request_id, actor=actor, wait=wait)

    def start(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Power a stopped instance on."""
        return self.run(Op.START, uuid, **options)

    def stop(self, uuid: str, *, timeout: float | None = None, **options: Unpack[CallOptions]) -> Task:
        """Power an instance off: clean shutdown within ``timeout`` seconds, then hard."""
        return self.run(Op.STOP, uuid, params={} if timeout is None else {"timeout": timeout}, **options)

    def reboot(self, uuid: str, *, hard: bool = False, **options: Unpack[CallOptions]) -> Task:
        """Reboot through the guest (soft) or by reset (hard, which may preempt some tasks)."""
        return self.run(Op.REBOOT_HARD if hard else Op.REBOOT, uuid, **options)

    def pause(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Freeze a running instance's vCPUs."""
        return self.run(Op.PAUSE, uuid, **options)

    def unpause(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Thaw a paused instance."""
        return self.run(Op.UNPAUSE, uuid, **options)

    def suspend(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Save a running instance's memory to disk and stop it."""
        return self.run(Op.SUSPEND, uuid, **options)

    def resume(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Restore a suspended instance."""
        return self.run(Op.RESUME, uuid, **options)

    def rescue(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Boot an instance from its rescue image."""
        return self.run(Op.RESCUE, uuid, **options)

    def unrescue(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Boot a rescued instance from its own disk again."""
        return self.run(Op.UNRESCUE, uuid, **options)

    def rebuild(self, uuid: str, *, image: str | None = None, **options: Unpack[CallOptions]) -> Task:
        """Replace the disk with a fresh one on ``image`` (default: the current image)."""
        return self.run(Op.REBUILD, uuid, params={} if image is None else {"image": image}, **options)

    def resize(self, uuid: str, flavor: Flavor, **options: Unpack[CallOptions]) -> Task:
        """Move the instance to a host with room for ``flavor``; it ends resized, awaiting confirm or revert.

        The scheduler places it by ``flavor``, its extra specs included. Shrinking the root disk, or
        resizing to the same size, is refused before anything changes.
        """
        if not isinstance(flavor, Flavor):
            raise InvalidInput(f"flavor must be a Flavor, got {type(flavor).__name__}")
        return self.run(Op.RESIZE, uuid, params={"flavor": flavor.as_dict()}, **options)

    def migrate(self, uuid: str, *, host: str | None = None, **options: Unpack[CallOptions]) -> Task:
        """Cold-migrate to ``host`` or where the scheduler puts it; ends resized, awaiting confirm or revert."""
        return self.run(Op.MIGRATE, uuid, params=_to(host), **options)

    def confirm_resize(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Make a finished move final: the source's kept disk and claim go."""
        return self.run(Op.CONFIRM_RESIZE, uuid, **options)

    def revert_resize(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Undo a finished move: back on the source, old flavor, previous vm_state."""
        return self.run(Op.REVERT_RESIZE, uuid, **options)

    def evacuate(self, uuid: str, *, host: str | None = None, **options: Unpack[CallOptions]) -> Task:
        """Rebuild an instance of a down, fenced host on ``host`` (or where the scheduler puts it), from its image.

        The instance keeps its uuid, name, flavor and image and ends active
        (stopped if it was stopped); data on the dead host's disk is lost.
        Refused with :class:`HostNotEvacuable` unless its host is down and fenced.
        """
        return self.run(Op.EVACUATE, uuid, params=_to(host), **options)

    def shelve(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Power off and snapshot an instance into an image the engine keeps; ends shelved.

        With ``shelved_offload_time`` 0 (the default, as Nova) it is offloaded
        at once (domain and disk destroyed, claims released, no host) and ends
        shelved_offloaded; otherwise the daemon offloads it after that time.
        """
        return self.run(Op.SHELVE, uuid, **options)

    def shelve_offload(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Destroy a shelved instance's domain and disk and release its host; ends shelved_offloaded."""
        return self.run(Op.SHELVE_OFFLOAD, uuid, **options)

    def unshelve(self, uuid: str, *, host: str | None = None, **options: Unpack[CallOptions]) -> Task:
        """Bring a shelved instance back, active; its snapshot image is deleted once it runs.

        A shelved instance is powered on where it is; an offloaded one is
        spawned from its snapshot on ``host`` or where the scheduler puts it.
        """
        return self.run(Op.UNSHELVE, uuid, params=_to(host), **options)

    def delete(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Delete an instance from any state, taking over any running task.

        With ``reclaim_instance_interval`` > 0 this is a soft delete of an idle
        active or stopped instance (restorable until the daemon reclaims it),
        as in Nova; otherwise, and from any other state, a delete.
        """
        if self.settings.reclaim_instance_interval > 0:
            instance = self.get(uuid)
            if instance.task_state is None and instance.vm_state in graph.operation(Op.SOFT_DELETE).allowed_vm_states:
                return self.run(Op.SOFT_DELETE, uuid, **options)
        return self.run(Op.DELETE, uuid, **options)

    def force_delete(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Delete at once (no clean shutdown) from any state, taking over any running task."""
        return self.run(Op.FORCE_DELETE, uuid, **options)

    def soft_delete(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Power an instance off and mark it soft-deleted, restorable."""
        return self.run(Op.SOFT_DELETE, uuid, **options)

    def restore(self, uuid: str, **options: Unpack[CallOptions]) -> Task:
        """Bring a soft-deleted instance back."""
        return self.run(Op.RESTORE, uuid, **options)

    def run(
        self,
        operation: str,
        uuid: str,
        *,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        actor: str = "api",
        cause: Cause = Cause.API,
        wait: bool = True,
        override_lock: bool = False,
    ) -> Task:
        """Run ``operation`` on an existing instance; see the module docstring.

        A locked instance refuses the call (:class:`InstanceLocked`) unless
        ``override_lock`` (an admin's override; the audit row names the actor).

        With ``idempotency_key``, a repeat of the same call (same operation,
        instance and arguments) returns the task the first call started, or
        raises its :class:`TaskFailed` again; the key reused for another call
        raises :class:`IdempotencyMismatch`.
        """
        return self.runner.start(
            operation,
            uuid,
            params=params,
            request_id=request_id,
            idempotency_key=idempotency_key,
            actor=actor,
            cause=cause,
            wait=wait,
            override_lock=override_lock,
        )

    # -- operator duties ---------------------------------------------------------------

    def lock(self, uuid: str, *, reason: str, actor: str = "api") -> Instance:
        """Lock an instance: operations but reads are refused until unlocked (or overridden by an admin)."""
        return duties.lock(self.services, uuid, reason=reason, actor=actor)

    def unlock(self, uuid: str, *, actor: str = "api", override_lock: bool = False) -> Instance:
        """Unlock an instance: its locker may, anyone with ``override_lock`` (an admin) may."""
        return duties.unlock(self.services, uuid, actor=actor, override_lock=override_lock)

    def reset_state(self, uuid: str, *, reason: str, state: VmState = VmState.ERROR, actor: str = "admin") -> Instance:
        """End a stuck task failed (cause admin), clear the task_state and set ``state`` (error or active)."""
        return duties.reset_state(self.services, uuid, state=state, reason=reason, actor=actor)

    def reclaim_queued_deletes(self, interval: float | None = None) -> builtins.list[duties.DutyResult]:
        """Delete for good what was soft-deleted longer ago than ``reclaim_instance_interval`` (or ``interval``)."""
        return duties.reclaim(self.services, interval)

    def offload_shelved_instances(self, older_than: float | None = None) -> builtins.list[duties.DutyResult]:
        """Offload what was shelved on its host longer ago than ``shelved_offload_time`` (or ``older_than``)."""
        return duties.offload_shelved(self.services, older_than)

    def check_build_timeouts(self, timeout: float | None = None) -> builtins.list[duties.DutyResult]:
        """Put builds running longer than ``instance_build_timeout`` (or ``timeout``) in error, their tasks failed."""
        return duties.check_build_timeouts(self.services, timeout)

    # -- change feed and audit queries -------------------------------------------------

    def changes(self, after: feed.Position | str | None = None, limit: int = 100) -> builtins.list[feed.Change]:
        """Return up to ``limit`` (1 to 10000) committed changes after ``after``, in feed order.

        ``after`` is a position or its ``tx:id`` text (None: the start; ``"end"``: the newest change
        readable now). Positions grow in commit order: paging with the last change's position never
        passes over a change, not even one that a transaction begun earlier commits later.
        """
        return self.store.read_changes(feed.resolve(self.store, after), feed.check_batch(limit, "limit"))

    def follow(
        self,
        consumer: str | None,
        handler: Callable[[feed.Change], object],
        *,
        stop: threading.Event | None = None,
        batch: int = 100,
        after: feed.Position | str | None = None,
    ) -> int:
        """Deliver the change feed to ``handler``, change by change, until ``stop`` is set; return how many.

        At least once and in order (see :mod:`lifecycle.feed`): a named ``consumer``'s position is
        stored only once the handler returned from the changes up to it, so a consumer killed
        mid-stream resumes where it stopped (a few changes may come twice); its first run registers
        it at ``after`` (default: the start), later runs ignore ``after``. ``consumer`` None follows
        from ``after`` and stores nothing. A ``stop`` already set delivers one batch (up to
        ``batch``, 1 to 10000) and returns. An exception from the handler stops the follow; the
        position of the changes before it is stored first. A database that goes away is waited for
        (:class:`~lifecycle.errors.DatabaseUnavailable` if ``stop`` is set meanwhile). Names starting with
        ``webhook:`` are the webhook senders' (:class:`InvalidInput`).
        """
        name = None if consumer is None else webhooks.check_consumer(validation.name("consumer", consumer))
        return feed.follow(
            self.store,
            name,
            handler,
            stop=stop if stop is not None else threading.Event(),
            batch=feed.check_batch(batch),
            poll=self.settings.feed_poll_interval,
            after=feed.resolve(self.store, after),
        )

    def consumers(self) -> builtins.list[feed.Consumer]:
        """Return the registered feed consumers and their positions, by name."""
        return self.store.consumers()

    def webhook_urls(self) -> dict[str, str]:
        """Return the URL each webhook sender's consumer posts to, by consumer name (never a secret)."""
        return self.store.consumer_urls()

    def forget_consumer(self, name: str) -> None:
        """Unregister a feed consumer: retention no longer waits for it (:class:`InvalidInput` if unknown)."""
        if not self.store.forget_consumer(validation.name("consumer", name)):
            known = ", ".join(c.name for c in self.store.consumers()) or "none"
            raise InvalidInput(f"no feed consumer named {name!r} (consumers: {known})")

    def prune_changes(self, older_than: float | None = None) -> int:
        """Delete the changes every consumer has passed that are older than the retention; return how many.

        The retention is ``older_than`` seconds, by default the ``change_retention`` setting; 0 keeps
        every change. The changes are the audit log: a pruned change is gone from ``history`` too.
        """
        retention = self.settings.change_retention if older_than is None else older_than
        return feed.prune(self.store, validation.seconds("change retention", retention), self.clock.now())

    def deliver_webhook(
        self,
        url: str,
        secret: bytes,
        *,
        stop: threading.Event,
        nova: bool = False,
        previous_secrets: tuple[bytes, ...] = (),
    ) -> int:
        """Post each change to ``url`` until ``stop`` is set; return how many were delivered.

        Signed with ``secret`` (and each of ``previous_secrets``, while receivers move to it), retried
        with backoff, at the URL's own feed consumer position (see :mod:`lifecycle.webhooks`); a first
        run starts at the newest change. ``nova`` posts Nova's ``instance.update`` notifications. The
        URL and secrets are checked before anything is registered (:class:`InvalidInput`); a second
        sender to one URL is refused (:class:`~lifecycle.errors.ConsumerInUse`).
        """
        hook = webhooks.Webhook(url, secret, nova=nova, previous_secrets=previous_secrets)
        return webhooks.deliver(self.services, hook, stop=stop)

    def audit(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        request_id: str | None = None,
        host: str | None = None,
        operation: str | None = None,
        cause: Cause | str | None = None,
        vm_state: VmState | str | None = None,
        limit: int = 1000,
    ) -> builtins.list[AuditEntry]:
        """Return the audit rows of every instance that all given filters admit, oldest first, at most ``limit``.

        ``since`` (inclusive) and ``until`` (exclusive) are timezone-aware; ``host`` is where the change
        happened; ``vm_state`` selects changes *into* that state ("which instances went to error").
        Each filter alone reads one index range: only the rows it returns.
        """
        return feed.query_audit(
            self.store,
            since=since,
            until=until,
            request_id=request_id,
            host=host,
            operation=operation,
            cause=cause,
            vm_state=vm_state,
            limit=limit,
        )

    # -- machinery -------------------------------------------------------------------

    def _connect(self, host: Host) -> Driver:
        s = self.settings
        return drivers.connect(
            host.driver_uri,
            host.name,
            host.instances_path,
            domain_type=s.libvirt_domain_type,
            vnc_listen=host.console_address or s.vnc_listen,
            soft_reboot_seconds=s.soft_reboot_seconds,
        )
