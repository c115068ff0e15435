"""The facade embedders call: run operations on instances and read their state.

The rest is grouped by noun on the engine: ``engine.hosts``, ``engine.images``,
``engine.feed`` (changes, consumers, webhooks, audit queries), ``engine.duties``
and ``engine.consoles`` (see :mod:`lifecycle.facade`).

Every operation goes the same way: validate the arguments, check the
guard from the operations table, start a task with a compare-and-swap, run its
steps, and end it. ``wait=True`` (the default) runs the task in the caller's
thread and returns it finished; ``wait=False`` returns it running and runs it
on the engine's executor, and ``engine.wait(task.id)`` waits for its end.
"""

from __future__ import annotations

import builtins
import uuid as uuidlib
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from lifecycle import duties, graph, validation
from lifecycle.clock import Clock, SystemClock
from lifecycle.config import Settings
from lifecycle.context import Services
from lifecycle.errors import InvalidInput
from lifecycle.facade import Consoles, DriverCache, DriverFactory, Duties, Feed, Hosts, Images, Reads
from lifecycle.graph import Op
from lifecycle.logs import get_logger
from lifecycle.metrics import Metrics
from lifecycle.records import Cause, Flavor, Instance, Task
from lifecycle.recovery import Recovered, recover_tasks
from lifecycle.runner import Runner
from lifecycle.states import VmState
from lifecycle.store import DEFAULT_DB_URL, Store, check_schema
from lifecycle.waiting import Waits

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["CallOptions", "Engine"]

log = get_logger(__name__)


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


class Engine(Reads, Waits):
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
        self.drivers = DriverCache(self.store, driver_factory, self.settings)
        """The hosts' drivers, each opened once (``engine.hosts.driver(name)`` returns one)."""
        self.runner = Runner(self.store, self.settings, self.drivers.get, self.owner)
        """Starts tasks and runs their workers (guards, idempotency, preemption, pool, leases).

        ``runner.wait_idle()`` waits for the tasks started with ``wait=False``; ``runner.active`` names those running.
        """
        self.metrics = Metrics(self.store, self.settings, metrics_registry)
        """Prometheus metrics; ``metrics.registry`` is what to serve (a new registry unless one is given)."""
        self.services = Services(self.store, self.settings, self.runner, self.metrics, self.drivers.get, self.clock)
        """What the engine gives its services (sync, duties, evacuation, the resize window, webhooks): not itself."""
        self.hosts = Hosts(self.services, self.drivers)
        """Hosts: register, fence, evacuate, heartbeat, sync (:class:`lifecycle.facade.Hosts`)."""
        self.images = Images(self.services)
        """Images: register, list, clean a host's cache (:class:`lifecycle.facade.Images`)."""
        self.feed = Feed(self.services)
        """Change feed, consumers, webhooks, audit queries (:class:`lifecycle.facade.Feed`)."""
        self.duties = Duties(self.services)
        """Operator duties: resize window, reclaim, offload, build timeouts (:class:`lifecycle.facade.Duties`)."""
        self.consoles = Consoles(self.services)
        """Console tokens (:class:`lifecycle.facade.Consoles`)."""

    def close(self) -> None:
        """Wait for background tasks, stop the heartbeat, close drivers and the database."""
        self.runner.close()
        self.drivers.close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- reads: get, list, task, tasks, steps, history, migrations, migration (lifecycle.facade.Reads) ---

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
        if not isinstance(force, bool):
            raise InvalidInput(f"force must be True or False, got {force!r}")
        if owner is not None:
            validation.name("owner", owner)
        results = recover_tasks(self.runner, force=force, of_owner=owner)
        self.metrics.observe_recovery(results)
        return results

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
        idempotency_key: str | None = None,
        actor: str = "api",
        wait: bool = True,
        project_id: str | None = None,
        user_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Task:
        """Build a new instance, on ``host`` or where the scheduler puts it; returns the create task.

        A spawn that fails is rescheduled on another host up to
        ``scheduler.max_attempts`` times (not when a host was named); the
        instance then goes to error with every attempt in its audit log.
        ``project_id``, ``user_id`` and ``metadata`` (Nova's limits: at most 128 pairs of
        strings up to 255 characters) say whom it is for; its first audit row records them.
        ``idempotency_key`` works as in :meth:`run`; a repeat needs no ``uuid`` to find the first call's instance.
        """
        if not isinstance(flavor, Flavor):
            raise InvalidInput(f"flavor must be a Flavor, got {type(flavor).__name__}")
        params: dict[str, Any] = {"name": name, "flavor": flavor.as_dict(), "image": image}
        given = {"host": host, "availability_zone": availability_zone, "project_id": project_id, "user_id": user_id}
        params |= {key: value for key, value in (*given.items(), ("metadata", metadata or None)) if value is not None}
        return self.runner.start(
            Op.CREATE,
            uuid,
            params=params,
            request_id=request_id,
            idempotency_key=idempotency_key,
            actor=actor,
            wait=wait,
        )

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
        instance and arguments) answers as the first call does: with ``wait``
        it waits for a first call still running and returns its task or
        raises its :class:`TaskFailed` or :class:`Preempted`; without, it
        returns the task as it is. The key reused for another call raises
        :class:`IdempotencyMismatch`.
        """
        if operation == Op.CREATE:  # a new instance has a name, a flavor and an image, not a uuid
            raise InvalidInput("an instance is created with Engine.create(name, flavor=..., image=...), not run")
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

    def lock(self, uuid: str, *, reason: str, actor: str = "api") -> Instance:
        """Lock an instance: operations but reads are refused until unlocked (or overridden by an admin)."""
        return duties.lock(self.services, uuid, reason=reason, actor=actor)

    def unlock(self, uuid: str, *, actor: str = "api", override_lock: bool = False) -> Instance:
        """Unlock an instance: its locker may, anyone with ``override_lock`` (an admin) may."""
        return duties.unlock(self.services, uuid, actor=actor, override_lock=override_lock)

    def reset_state(self, uuid: str, *, reason: str, state: VmState = VmState.ERROR, actor: str = "admin") -> Instance:
        """End a stuck task failed (cause admin), clear the task_state and set ``state`` (error or active)."""
        return duties.reset_state(self.services, uuid, state=state, reason=reason, actor=actor)
