"""Every error the engine and its drivers raise, rooted at one class.

This is a leaf module: it imports nothing from the package but its two private
parts (the roots; the errors of hypervisors and the database), so drivers and
the store can use it without pulling in the engine; import every error from
here. Errors carry their data as attributes and print as one line a user can
act on.

The tree::

    LifecycleError
    ├── InvalidInput            a bad argument; nothing was changed
    │   ├── InstanceNotFound
    │   ├── HostNotFound
    │   ├── ImageNotFound
    │   ├── InvalidFlavor
    │   ├── AlreadyExists
    │   ├── TaskNotFound
    │   ├── MigrationNotFound
    │   ├── IdempotencyMismatch  a key reused for another call
    │   ├── HostInUse            a host still holds instances
    │   ├── ConsumerInUse        another exclusive follower holds the feed consumer
    │   └── InMemoryHostElsewhere  a fake:// host another process added: not synced nor served here
    ├── InvalidState            the operation's guard refused the current states
    ├── HostNotEvacuable        evacuate refused: the host is not both down and fenced
    ├── InstanceLocked          the instance is locked; only an admin override runs an operation
    ├── Conflict                a compare-and-swap lost against a concurrent write
    ├── Preempted               the running task was taken over (delete, hard reboot)
    │   └── Fenced              ... by recovery (a newer epoch): the old worker must stop
    ├── TaskFailed              the operation ran and failed; ``task`` says why
    │   └── NoValidHostFailed   ... because no host had room (also a NoValidHost: ``reasons`` per host)
    ├── NoValidHost             no host passed the scheduler's filters; reasons per host
    │   └── NoValidHostFailed   (the same class: ``except NoValidHost`` and ``except TaskFailed`` both catch it)
    ├── SchemaOutOfDate         the database is not at the migrations' head
    ├── DatabaseUnavailable     the database could not be reached or read (``transient``: retry may cure it)
    └── DriverError             the hypervisor refused or failed a call
        ├── DomainNotFound      the domain does not exist on that host
        ├── CopyFailed          a move's disk copy failed; the destination kept nothing
        ├── EvacuatedCopiesPending  heartbeat refused: the host's copies of evacuated instances remain
        ├── StaleObject         a domain of another attempt is in the way; never adopted nor started
        └── DriverUnavailable   transient: the hypervisor cannot be reached now
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from lifecycle._errors_base import InvalidInput, LifecycleError
from lifecycle._errors_base import text as _text
from lifecycle._errors_infra import (
    CopyFailed,
    DatabaseUnavailable,
    DomainNotFound,
    DriverError,
    DriverUnavailable,
    EvacuatedCopiesPending,
    InMemoryHostElsewhere,
    StaleObject,
)

if TYPE_CHECKING:
    from lifecycle.records import Task

__all__ = [
    "AlreadyExists",
    "Conflict",
    "ConsumerInUse",
    "CopyFailed",
    "DatabaseUnavailable",
    "DomainNotFound",
    "DriverError",
    "DriverUnavailable",
    "EvacuatedCopiesPending",
    "Fenced",
    "HostInUse",
    "HostNotEvacuable",
    "HostNotFound",
    "IdempotencyMismatch",
    "ImageNotFound",
    "InMemoryHostElsewhere",
    "InstanceLocked",
    "InstanceNotFound",
    "InvalidFlavor",
    "InvalidInput",
    "InvalidState",
    "LifecycleError",
    "MigrationNotFound",
    "NoValidHost",
    "NoValidHostFailed",
    "Preempted",
    "SchemaOutOfDate",
    "StaleObject",
    "TaskFailed",
    "TaskNotFound",
]


class InstanceNotFound(InvalidInput):
    """No (live) instance has this uuid."""

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        super().__init__(f"instance {uuid} not found")


class HostNotFound(InvalidInput):
    """No host has this name."""

    def __init__(self, name: str, known: Iterable[str] = ()) -> None:
        self.name = name
        self.known = sorted(known)
        hint = f" (known hosts: {', '.join(self.known)})" if self.known else " (no hosts: add one)"
        super().__init__(f"host {name!r} not found{hint}")


class ImageNotFound(InvalidInput):
    """No image has this name."""

    def __init__(self, name: str, known: Iterable[str] = ()) -> None:
        self.name = name
        self.known = sorted(known)
        hint = f" (known images: {', '.join(self.known)})" if self.known else " (no images: add one)"
        super().__init__(f"image {name!r} not found{hint}")


class InvalidFlavor(InvalidInput):
    """A flavor (vcpus, memory, disk) is malformed or out of range."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid flavor {text!r}: {reason}")


class AlreadyExists(InvalidInput):
    """A host or image with this name is already registered."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(f"{kind} {name!r} already exists")


class TaskNotFound(InvalidInput):
    """No task has this id."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id!r} not found")


class MigrationNotFound(InvalidInput):
    """No migration has this id."""

    def __init__(self, migration_id: str) -> None:
        self.migration_id = migration_id
        super().__init__(f"migration {migration_id!r} not found")


class IdempotencyMismatch(InvalidInput):
    """An idempotency key was reused for a different operation, instance or parameters."""

    def __init__(self, key: str, task: Task, operation: str, uuid: str) -> None:
        self.key = key
        self.task = task
        super().__init__(
            f"idempotency key {key!r} already names {task.operation} task {task.id} on instance"
            f" {task.instance_uuid} (arguments {task.params}); this call is {operation} on {uuid}:"
            " a key may be repeated only for the very same call"
        )


class HostInUse(InvalidInput):
    """A host cannot be removed while instances live on it (unless forced)."""

    def __init__(self, name: str, instances: Iterable[str]) -> None:
        self.name = name
        self.instances = sorted(instances)
        shown = ", ".join(self.instances[:5]) + (" ..." if len(self.instances) > 5 else "")
        super().__init__(
            f"host {name!r} still holds {len(self.instances)} instance(s) ({shown}):"
            " delete or move them first, or remove with force"
        )


class InvalidState(LifecycleError):
    """The operation is not allowed from the instance's current states."""

    def __init__(
        self,
        operation: str,
        uuid: str,
        vm_state: object,
        task_state: object,
        allowed_vm_states: Iterable[object],
        allowed_task_states: Iterable[object],
        reason: str | None = None,
    ) -> None:
        self.operation = operation
        self.reason = reason
        self.uuid = uuid
        self.vm_state = vm_state
        self.task_state = task_state
        self.allowed_vm_states = sorted(_text(s) for s in allowed_vm_states)
        self.allowed_task_states = sorted(_text(s) for s in allowed_task_states)
        super().__init__(
            f"cannot {operation} instance {uuid} in vm_state {_text(vm_state)}"
            f" with task_state {_text(task_state)};"
            f" {operation} is allowed from vm_state {', '.join(self.allowed_vm_states)}"
            f" with task_state {', '.join(self.allowed_task_states)}" + ("" if reason is None else f"; {reason}")
        )


class HostNotEvacuable(LifecycleError):
    """Evacuate needs the host down (no heartbeat) and fenced by an operator; ``failing`` names what is not."""

    def __init__(self, host: str, *, down: bool, fenced: bool, uuid: str | None = None) -> None:
        self.host = host
        self.uuid = uuid
        self.down = down
        self.fenced = fenced
        self.failing = [name for name, ok in (("down", down), ("fenced", fenced)) if not ok]
        what = f"instance {uuid} on host {host}" if uuid else f"host {host}"
        needs = []
        if not down:
            needs.append("it is not down (its daemon's heartbeat is recent; a host must be silent for host_down_after)")
        if not fenced:
            needs.append("it is not fenced (`lifecycle host fence` it once it is known dead)")
        super().__init__(f"cannot evacuate {what}: " + "; ".join(needs))


class InstanceLocked(LifecycleError):
    """The instance is locked: no operation but a read runs on it without an admin override."""

    def __init__(self, operation: str, uuid: str, locked_by: str, reason: str | None, at: object) -> None:
        self.operation = operation
        self.uuid = uuid
        self.locked_by = locked_by
        self.reason = reason
        super().__init__(
            f"cannot {operation} instance {uuid}: locked by {locked_by} at {_text(at)}"
            + ("" if not reason else f" ({reason})")
            + "; unlock it, or override the lock as an admin (--force)"
        )


class Conflict(LifecycleError):
    """A compare-and-swap matched no row: someone else changed the instance first."""

    def __init__(self, uuid: str, expected: Mapping[str, object], actual: Mapping[str, object] | None) -> None:
        self.uuid = uuid
        self.expected = dict(expected)
        self.actual = None if actual is None else dict(actual)
        if actual is None:
            detail = "the instance is gone"
        else:
            diffs = [
                f"{k} {_text(actual.get(k))} (expected {_text(v)})" for k, v in expected.items() if actual.get(k) != v
            ]
            detail = ", ".join(diffs) or "a concurrent write changed it"
        super().__init__(f"instance {uuid} changed concurrently: {detail}")


class Preempted(LifecycleError):
    """The task was taken over by another task; its worker must stop."""

    def __init__(self, task_id: str, uuid: str, preempted_by: str | None) -> None:
        self.task_id = task_id
        self.uuid = uuid
        self.preempted_by = preempted_by
        super().__init__(f"task {task_id} on instance {uuid} was preempted by task {_text(preempted_by)}")


class Fenced(Preempted):
    """Recovery took the task over (its epoch grew): this worker must stop before its next driver call."""

    def __init__(self, task_id: str, uuid: str, epoch: int, current: int) -> None:
        self.epoch = epoch
        self.current = current
        LifecycleError.__init__(
            self,
            f"task {task_id} on instance {uuid} was taken over by recovery (epoch {current}, this worker holds"
            f" {epoch}): this worker stops",
        )
        self.task_id = task_id
        self.uuid = uuid
        self.preempted_by = None


class TaskFailed(LifecycleError):
    """The operation ran and failed; ``task`` (the finished task record) holds the error and the traceback."""

    def __init__(self, task: Task, error: str) -> None:
        self.task = task
        self.error = error
        super().__init__(f"{task.operation} task {task.id} on instance {task.instance_uuid} failed: {error}")


class NoValidHost(LifecycleError):
    """No host passed the scheduler's filters; ``reasons`` maps each host to why."""

    def __init__(self, reasons: Mapping[str, str]) -> None:
        self.reasons = dict(reasons)
        detail = "; ".join(f"{host}: {why}" for host, why in sorted(self.reasons.items())) or "no hosts are registered"
        super().__init__(f"no valid host found ({detail})")


class NoValidHostFailed(NoValidHost, TaskFailed):
    """A create or move ran and ended failed because no host would take it: ``task`` and ``reasons`` both set.

    Raised by the call that waited for the task, in place of a plain
    :class:`TaskFailed`: ``except NoValidHost`` (answer "no room", HTTP 409 or
    507) and ``except TaskFailed`` both catch it. ``reasons`` maps each host to
    why it was passed over; a host where a spawn was tried and failed gives that
    failure (its hypervisor's own message), not only "already tried".
    """

    def __init__(self, task: Task, error: str, reasons: Mapping[str, str]) -> None:
        TaskFailed.__init__(self, task, error)
        self.reasons = dict(reasons)


class SchemaOutOfDate(LifecycleError):
    """The database schema is not at the head revision of the migrations."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(f"database schema is at {_text(current)}, expected {head}: run `lifecycle db upgrade`")


class ConsumerInUse(InvalidInput):
    """Another follower holds the named consumer (one per name; a webhook sender per URL); nothing was delivered."""

    def __init__(self, consumer: str, detail: str | None = None) -> None:
        self.consumer = consumer
        holder = detail or "another follower holds it"
        super().__init__(f"feed consumer {consumer!r} is in use: {holder}; one follower at a time")
