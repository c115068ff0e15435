"""The three state dimensions of an instance and the user-facing status word.

Stored values are Nova's and are frozen: add members, never rename one, because
rows written by earlier versions must keep their meaning.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = [
    "MIGRATION_TRANSITIONS",
    "STATUSES",
    "MigrationStatus",
    "PowerState",
    "TaskState",
    "VmState",
    "StatusPairs",
    "status_of",
    "status_pairs",
]


class VmState(enum.StrEnum):
    """The stable state the user asked for."""

    ACTIVE = "active"
    BUILDING = "building"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    STOPPED = "stopped"
    RESCUED = "rescued"
    RESIZED = "resized"
    SOFT_DELETED = "soft-delete"
    DELETED = "deleted"
    ERROR = "error"
    SHELVED = "shelved"
    SHELVED_OFFLOADED = "shelved_offloaded"


class TaskState(enum.StrEnum):
    """The step of the operation in flight; ``None`` in a column means idle."""

    SCHEDULING = "scheduling"
    NETWORKING = "networking"
    BLOCK_DEVICE_MAPPING = "block_device_mapping"
    SPAWNING = "spawning"
    POWERING_OFF = "powering-off"
    POWERING_ON = "powering-on"
    REBOOTING = "rebooting"
    REBOOT_PENDING = "reboot_pending"
    REBOOT_STARTED = "reboot_started"
    REBOOTING_HARD = "rebooting_hard"
    REBOOT_PENDING_HARD = "reboot_pending_hard"
    REBOOT_STARTED_HARD = "reboot_started_hard"
    PAUSING = "pausing"
    UNPAUSING = "unpausing"
    SUSPENDING = "suspending"
    RESUMING = "resuming"
    RESCUING = "rescuing"
    UNRESCUING = "unrescuing"
    RESIZE_PREP = "resize_prep"
    RESIZE_MIGRATING = "resize_migrating"
    RESIZE_MIGRATED = "resize_migrated"
    RESIZE_FINISH = "resize_finish"
    RESIZE_REVERTING = "resize_reverting"
    RESIZE_CONFIRMING = "resize_confirming"
    REBUILDING = "rebuilding"
    REBUILD_BLOCK_DEVICE_MAPPING = "rebuild_block_device_mapping"
    REBUILD_SPAWNING = "rebuild_spawning"
    DELETING = "deleting"
    SOFT_DELETING = "soft-deleting"
    RESTORING = "restoring"
    SHELVING = "shelving"
    SHELVING_IMAGE_PENDING_UPLOAD = "shelving_image_pending_upload"
    SHELVING_IMAGE_UPLOADING = "shelving_image_uploading"
    SHELVING_OFFLOADING = "shelving_offloading"
    UNSHELVING = "unshelving"


class PowerState(enum.IntEnum):
    """What the hypervisor last reported, with Nova's numbering (2 and 5 unused)."""

    NOSTATE = 0
    RUNNING = 1
    PAUSED = 3
    SHUTDOWN = 4
    CRASHED = 6
    SUSPENDED = 7


_REBOOT = (TaskState.REBOOTING, TaskState.REBOOT_PENDING, TaskState.REBOOT_STARTED)
_HARD_REBOOT = (
    TaskState.REBOOTING_HARD,
    TaskState.REBOOT_PENDING_HARD,
    TaskState.REBOOT_STARTED_HARD,
)
_RESIZE = (
    TaskState.RESIZE_PREP,
    TaskState.RESIZE_MIGRATING,
    TaskState.RESIZE_MIGRATED,
    TaskState.RESIZE_FINISH,
)
_REBUILD = (
    TaskState.REBUILDING,
    TaskState.REBUILD_BLOCK_DEVICE_MAPPING,
    TaskState.REBUILD_SPAWNING,
)


def _each(states: tuple[TaskState, ...], status: str) -> dict[TaskState, str]:
    return dict.fromkeys(states, status)


# Nova's _STATE_MAP: per vm_state, the default status and the task overrides.
# A task_state not listed for a vm_state falls through to the default, so an
# active instance that is being deleted still reads ACTIVE (as in Nova).
_STATUS: dict[VmState, tuple[str, dict[TaskState, str]]] = {
    VmState.ACTIVE: (
        "ACTIVE",
        {
            **_each(_REBOOT, "REBOOT"),
            **_each(_HARD_REBOOT, "HARD_REBOOT"),
            **_each(_REBUILD, "REBUILD"),
            **_each(_RESIZE, "RESIZE"),
        },
    ),
    VmState.BUILDING: ("BUILD", {}),
    VmState.STOPPED: ("SHUTOFF", {**_each(_RESIZE, "RESIZE"), **_each(_REBUILD, "REBUILD")}),
    VmState.RESIZED: ("VERIFY_RESIZE", {TaskState.RESIZE_REVERTING: "REVERT_RESIZE"}),
    VmState.PAUSED: ("PAUSED", {}),
    VmState.SUSPENDED: ("SUSPENDED", {}),
    VmState.RESCUED: ("RESCUE", {}),
    VmState.ERROR: ("ERROR", _each(_REBUILD, "REBUILD")),
    VmState.DELETED: ("DELETED", {}),
    VmState.SOFT_DELETED: ("SOFT_DELETED", {}),
    VmState.SHELVED: ("SHELVED", {}),
    VmState.SHELVED_OFFLOADED: ("SHELVED_OFFLOADED", {}),
}


def status_of(vm_state: VmState, task_state: TaskState | None) -> str:
    """Return the API status word for a pair exactly as Nova's API derives it."""
    default, overrides = _STATUS[vm_state]
    if task_state is None:
        return default
    return overrides.get(task_state, default)


class StatusPairs(NamedTuple):
    """The (vm_state, task_state) pairs of one status in one vm_state (see :func:`status_pairs`)."""

    vm_state: VmState
    default: bool
    """True: a task_state of None or any but ``task_states``; False: only one of ``task_states``."""
    task_states: frozenset[TaskState]


def status_pairs(status: str) -> list[StatusPairs]:
    """Return the pairs :func:`status_of` maps to ``status``, per vm_state (empty for an unknown status word)."""
    found = []
    for vm_state, (default, overrides) in _STATUS.items():
        if default == status:
            others = frozenset(t for t, word in overrides.items() if word != status)
            found.append(StatusPairs(vm_state, True, others))
        elif status in overrides.values():
            found.append(StatusPairs(vm_state, False, frozenset(t for t, w in overrides.items() if w == status)))
    return found


STATUSES = frozenset(word for default, overrides in _STATUS.values() for word in (default, *overrides.values()))
"""Every status word :func:`status_of` can return."""


class MigrationStatus(enum.StrEnum):
    """How far a cold migration, resize or evacuation got (Nova's migration status values)."""

    PRE_MIGRATING = "pre-migrating"
    MIGRATING = "migrating"
    POST_MIGRATING = "post-migrating"
    FINISHED = "finished"
    CONFIRMING = "confirming"
    CONFIRMED = "confirmed"
    REVERTING = "reverting"
    REVERTED = "reverted"
    ERROR = "error"
    DONE = "done"
    """An evacuation rebuilt the instance elsewhere; the dead source may still hold its old copy."""
    COMPLETED = "completed"
    """The evacuated source answered again and its old copy was destroyed."""

    @property
    def open(self) -> bool:
        """Whether the move still holds something on the source (not confirmed, reverted, failed or completed)."""
        return self not in (_M.CONFIRMED, _M.REVERTED, _M.ERROR, _M.COMPLETED)


_M = MigrationStatus
# An evacuation goes pre-migrating -> done (rebuilt on the destination) -> completed (the returning source's
# old copy destroyed), as Nova's; it is never confirmed or reverted. A delete confirms whatever move is open,
# from any open status, so that the source keeps nothing; a delete whose source host is down confirms without
# it (the source's cache cleanup removes the copy later).
MIGRATION_TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    _M.PRE_MIGRATING: frozenset({_M.MIGRATING, _M.ERROR, _M.CONFIRMING, _M.CONFIRMED, _M.DONE}),
    _M.MIGRATING: frozenset({_M.POST_MIGRATING, _M.ERROR, _M.CONFIRMING, _M.CONFIRMED}),
    _M.POST_MIGRATING: frozenset({_M.FINISHED, _M.ERROR, _M.CONFIRMING, _M.CONFIRMED}),
    _M.FINISHED: frozenset({_M.CONFIRMING, _M.REVERTING, _M.CONFIRMED}),
    # back to finished: the source did not answer; error: a delete cleaned up a move it cut short
    _M.CONFIRMING: frozenset({_M.CONFIRMED, _M.FINISHED, _M.ERROR}),
    _M.REVERTING: frozenset({_M.REVERTED, _M.ERROR, _M.CONFIRMING, _M.CONFIRMED}),
    _M.CONFIRMED: frozenset(),
    _M.REVERTED: frozenset(),
    _M.ERROR: frozenset(),
    _M.DONE: frozenset({_M.COMPLETED}),
    _M.COMPLETED: frozenset(),
}
"""Which status a migration may go to from each; the store refuses any other write (writing the
current status again is allowed: a step resumed after a crash repeats its write)."""


def _check_migration_chart() -> None:
    """Every status is reachable from pre-migrating, the closed ones are terminal and the open ones have exits."""
    seen, todo = {_M.PRE_MIGRATING}, [_M.PRE_MIGRATING]
    while todo:
        for nxt in MIGRATION_TRANSITIONS[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert seen == set(MigrationStatus), f"unreachable migration statuses: {set(MigrationStatus) - seen}"
    for status, exits in MIGRATION_TRANSITIONS.items():
        assert bool(exits) == status.open, f"migration status {status} must {'have' if status.open else 'lack'} exits"


_check_migration_chart()
