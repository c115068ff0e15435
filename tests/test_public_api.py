"""The public surface: small, sorted, typed, and changed only on purpose."""

from __future__ import annotations

from pathlib import Path

import lifecycle

EXPECTED = {
    "AlreadyExists",
    "AsyncEngine",
    "AuditEntry",
    "Cause",
    "Change",
    "Conflict",
    "ConsoleAccess",
    "ConsoleConnection",
    "Consumer",
    "ConsumerInUse",
    "DatabaseUnavailable",
    "DomainNotFound",
    "DriverError",
    "DriverUnavailable",
    "Engine",
    "Flavor",
    "Host",
    "HostInUse",
    "HostNotEvacuable",
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
    "TaskWaitTimeout",
    "VmState",
    "status_of",
    "upgrade",
}


def test_exported_names_do_not_drift() -> None:
    """__all__ is exactly the reviewed public surface, sorted, and every name resolves."""
    assert set(lifecycle.__all__) == EXPECTED
    assert list(lifecycle.__all__) == sorted(lifecycle.__all__)
    for name in lifecycle.__all__:
        assert getattr(lifecycle, name) is not None


def test_packages_are_typed() -> None:
    """Lifecycle and drivers ship py.typed."""
    root = Path(__file__).parents[1]
    assert (root / "lifecycle" / "py.typed").exists() and (root / "drivers" / "py.typed").exists()


def test_every_error_derives_from_the_root() -> None:
    """Every exported exception is a LifecycleError, so callers can catch one class."""
    errors = [
        getattr(lifecycle, n)
        for n in lifecycle.__all__
        if n.endswith(("Error", "Found", "Exists"))
        or n
        in {
            "Conflict",
            "ConsumerInUse",
            "DatabaseUnavailable",
            "HostInUse",
            "IdempotencyMismatch",
            "InvalidState",
            "InvalidInput",
            "InvalidFlavor",
            "Preempted",
            "TaskFailed",
            "SchemaOutOfDate",
            "TaskWaitTimeout",
        }
    ]
    assert errors and all(issubclass(e, lifecycle.LifecycleError) for e in errors)
