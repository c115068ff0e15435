"""lifecycle: an embeddable engine for the lifecycle of virtual machine instances.

The public surface is re-exported here; everything else is internal. Every
name loads on first use: the drivers import the contract side of this
package (errors, states), which must not pull the engine in, and a CLI
command that needs no database must not pay for importing one.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lifecycle.aio import AsyncEngine
    from lifecycle.audit import AuditEntry, Change, Consumer, Position
    from lifecycle.config import Settings
    from lifecycle.console import ConsoleAccess, ConsoleConnection
    from lifecycle.daemon import Daemon
    from lifecycle.engine import CallOptions, Engine
    from lifecycle.errors import (
        AlreadyExists,
        Conflict,
        ConsumerInUse,
        CopyFailed,
        DatabaseUnavailable,
        DomainNotFound,
        DriverError,
        DriverUnavailable,
        EvacuatedCopiesPending,
        Fenced,
        HostInUse,
        HostNotEvacuable,
        HostNotFound,
        IdempotencyMismatch,
        ImageNotFound,
        InMemoryHostElsewhere,
        InstanceLocked,
        InstanceNotFound,
        InvalidFlavor,
        InvalidInput,
        InvalidState,
        LifecycleError,
        MigrationNotFound,
        NoValidHost,
        NoValidHostFailed,
        Preempted,
        SchemaOutOfDate,
        StaleObject,
        TaskFailed,
        TaskNotFound,
    )
    from lifecycle.records import Cause, Flavor, Host, Image, Instance, Outcome, Task, TaskStep
    from lifecycle.states import PowerState, TaskState, VmState, status_of
    from lifecycle.store import upgrade
    from lifecycle.waiting import TaskWaitTimeout

__all__ = [
    "AlreadyExists",
    "AsyncEngine",
    "AuditEntry",
    "CallOptions",
    "Cause",
    "Change",
    "Conflict",
    "ConsoleAccess",
    "ConsoleConnection",
    "Consumer",
    "ConsumerInUse",
    "CopyFailed",
    "Daemon",
    "DatabaseUnavailable",
    "DomainNotFound",
    "DriverError",
    "DriverUnavailable",
    "Engine",
    "EvacuatedCopiesPending",
    "Fenced",
    "Flavor",
    "Host",
    "HostInUse",
    "HostNotEvacuable",
    "HostNotFound",
    "IdempotencyMismatch",
    "Image",
    "ImageNotFound",
    "InMemoryHostElsewhere",
    "Instance",
    "InstanceLocked",
    "InstanceNotFound",
    "InvalidFlavor",
    "InvalidInput",
    "InvalidState",
    "LifecycleError",
    "MigrationNotFound",
    "NoValidHost",
    "NoValidHostFailed",
    "Outcome",
    "Position",
    "PowerState",
    "Preempted",
    "SchemaOutOfDate",
    "Settings",
    "StaleObject",
    "Task",
    "TaskFailed",
    "TaskNotFound",
    "TaskState",
    "TaskStep",
    "TaskWaitTimeout",
    "VmState",
    "status_of",
    "upgrade",
]


_HOME = {
    "lifecycle.aio": ("AsyncEngine",),
    "lifecycle.audit": ("AuditEntry", "Change", "Consumer", "Position"),
    "lifecycle.config": ("Settings",),
    "lifecycle.console": ("ConsoleAccess", "ConsoleConnection"),
    "lifecycle.daemon": ("Daemon",),
    "lifecycle.engine": ("CallOptions", "Engine"),
    "lifecycle.errors": (
        "AlreadyExists", "Conflict", "ConsumerInUse", "CopyFailed", "DatabaseUnavailable", "DomainNotFound",
        "DriverError",
        "DriverUnavailable", "EvacuatedCopiesPending", "Fenced", "HostInUse", "HostNotEvacuable", "HostNotFound",
        "IdempotencyMismatch", "ImageNotFound", "InMemoryHostElsewhere", "InstanceLocked", "InstanceNotFound",
        "InvalidFlavor", "InvalidInput", "InvalidState", "LifecycleError", "MigrationNotFound", "NoValidHost",
        "NoValidHostFailed", "Preempted", "SchemaOutOfDate", "StaleObject", "TaskFailed", "TaskNotFound",
    ),
    "lifecycle.records": ("Cause", "Flavor", "Host", "Image", "Instance", "Outcome", "Task", "TaskStep"),
    "lifecycle.states": ("PowerState", "TaskState", "VmState", "status_of"),
    "lifecycle.store": ("upgrade",),
    "lifecycle.waiting": ("TaskWaitTimeout",),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use: importing the package (or the CLI) stays cheap."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'lifecycle' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
