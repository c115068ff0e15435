"""lifecycle: an embeddable engine for the lifecycle of virtual machine instances.

The public surface is re-exported here; everything else is internal.
``Engine`` and ``upgrade`` load on first use: the drivers import the contract
side of this package (errors, states), which must not pull the engine in.
"""

from typing import TYPE_CHECKING, Any

from lifecycle.audit import AuditEntry, Change, Consumer, Position
from lifecycle.config import Settings
from lifecycle.console import ConsoleAccess, ConsoleConnection
from lifecycle.errors import (
    AlreadyExists,
    Conflict,
    DomainNotFound,
    DriverError,
    DriverUnavailable,
    HostInUse,
    HostNotFound,
    IdempotencyMismatch,
    ImageNotFound,
    InstanceNotFound,
    InvalidFlavor,
    InvalidInput,
    InvalidState,
    LifecycleError,
    NoValidHost,
    Preempted,
    SchemaOutOfDate,
    TaskFailed,
    TaskNotFound,
)
from lifecycle.records import Cause, Flavor, Host, Image, Instance, Outcome, Task, TaskStep
from lifecycle.states import PowerState, TaskState, VmState, status_of

if TYPE_CHECKING:
    from lifecycle.engine import Engine
    from lifecycle.store import upgrade

__all__ = [
    "AlreadyExists",
    "AuditEntry",
    "Cause",
    "Change",
    "Conflict",
    "ConsoleAccess",
    "ConsoleConnection",
    "Consumer",
    "DomainNotFound",
    "DriverError",
    "DriverUnavailable",
    "Engine",
    "Flavor",
    "Host",
    "HostInUse",
    "HostNotFound",
    "IdempotencyMismatch",
    "Image",
    "ImageNotFound",
    "Instance",
    "InstanceNotFound",
    "InvalidFlavor",
    "InvalidInput",
    "InvalidState",
    "LifecycleError",
    "NoValidHost",
    "Outcome",
    "Position",
    "PowerState",
    "Preempted",
    "SchemaOutOfDate",
    "Settings",
    "Task",
    "TaskFailed",
    "TaskNotFound",
    "TaskState",
    "TaskStep",
    "VmState",
    "status_of",
    "upgrade",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from lifecycle.engine import Engine

        return Engine
    if name == "upgrade":
        from lifecycle.store import upgrade

        return upgrade
    raise AttributeError(f"module 'lifecycle' has no attribute {name!r}")
