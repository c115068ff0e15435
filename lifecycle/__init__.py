"""lifecycle: an embeddable engine for the lifecycle of virtual machine instances.

The public surface is re-exported here; everything else is internal.
"""

from lifecycle.audit import AuditEntry
from lifecycle.config import Settings
from lifecycle.engine import Engine
from lifecycle.errors import (
    AlreadyExists,
    Conflict,
    DomainNotFound,
    DriverError,
    DriverUnavailable,
    HostNotFound,
    ImageNotFound,
    InstanceNotFound,
    InvalidFlavor,
    InvalidInput,
    InvalidState,
    LifecycleError,
    Preempted,
    SchemaOutOfDate,
    TaskFailed,
)
from lifecycle.records import Cause, Flavor, Host, Image, Instance, Outcome, Task, TaskStep
from lifecycle.states import PowerState, TaskState, VmState, status_of
from lifecycle.store import upgrade

__all__ = [
    "AlreadyExists",
    "AuditEntry",
    "Cause",
    "Conflict",
    "DomainNotFound",
    "DriverError",
    "DriverUnavailable",
    "Engine",
    "Flavor",
    "Host",
    "HostNotFound",
    "Image",
    "ImageNotFound",
    "Instance",
    "InstanceNotFound",
    "InvalidFlavor",
    "InvalidInput",
    "InvalidState",
    "LifecycleError",
    "Outcome",
    "PowerState",
    "Preempted",
    "SchemaOutOfDate",
    "Settings",
    "Task",
    "TaskFailed",
    "TaskState",
    "TaskStep",
    "VmState",
    "status_of",
    "upgrade",
]
