"""The row type of the operations table (:mod:`lifecycle.graph`) and the vocabularies its rows are written in.

:class:`Op` names the engine's operations; :class:`Result`, :class:`Failure`
and :class:`Takeover` say how a row ends, fails and takes over running tasks;
:class:`Operation` is one row. The rows themselves are in
:mod:`lifecycle.graph_rows`; :mod:`lifecycle.graph` re-exports all of it and
holds the table in force and the machines built from it.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from lifecycle.states import PowerState, TaskState, VmState

__all__ = ["ANY_TASK", "ANY_VM", "IDLE", "Failure", "Op", "Operation", "Result", "Takeover", "resolve"]

V = VmState


class Op(enum.StrEnum):
    """The name of each operation of the table, as tasks, audit rows and the change feed store it.

    Stored values are frozen: add members, never rename. An operation added
    at run time (:func:`lifecycle.graph.register`) has a plain string name instead.
    """

    CREATE = "create"
    START = "start"
    FORCE_STOP = "force_stop"
    STOP = "stop"
    REBOOT = "reboot"
    REBOOT_HARD = "reboot_hard"
    PAUSE = "pause"
    UNPAUSE = "unpause"
    SUSPEND = "suspend"
    RESUME = "resume"
    RESCUE = "rescue"
    UNRESCUE = "unrescue"
    RESIZE = "resize"
    MIGRATE = "migrate"
    CONFIRM_RESIZE = "confirm_resize"
    REVERT_RESIZE = "revert_resize"
    REBUILD = "rebuild"
    EVACUATE = "evacuate"
    DELETE = "delete"
    FORCE_DELETE = "force_delete"
    SOFT_DELETE = "soft_delete"
    RESTORE = "restore"
    SHELVE = "shelve"
    SHELVE_OFFLOAD = "shelve_offload"
    UNSHELVE = "unshelve"


class Result(enum.StrEnum):
    """How an operation's final vm_state is chosen when it is not a fixed state."""

    PREVIOUS = "previous"
    """The vm_state recorded before the move began, active or stopped (revert_resize, from resized or error)."""
    BY_POWER = "by_power"
    """active when the guest runs afterwards, else stopped (confirm_resize)."""
    REBUILT = "rebuilt"
    """The starting vm_state, except error, which becomes active (rebuild)."""
    SHELVED = "shelved"
    """shelved_offloaded when the guest's domain is gone (offloaded at once), else shelved (shelve)."""


class Failure(enum.StrEnum):
    """What a failed operation does to the vm_state (the task always ends idle)."""

    REVERT_IF_UNCHANGED = "revert_if_unchanged"
    """Keep the vm_state when the guest's power is unchanged, else error."""
    ERROR = "error"
    """Always error: the guest cannot be known to be intact (create, delete)."""
    ACTIVE_IF_RUNNING = "active_if_running"
    """active when the guest runs afterwards, else error (hard reboot, as Nova)."""


class Takeover(enum.StrEnum):
    """What an operation that preempts running tasks does about the preempted worker's driver call still in flight."""

    DESTROY_LATE = "destroy_late"
    """It ends the instance: whatever the late call made is destroyed again (delete, force_delete)."""
    BY_POWER = "by_power"
    """It acts on the guest itself: it goes on at once over a late call leaving the guest in its own end power,
    and waits for any other to end so that it comes last (hard reboot)."""


IDLE: frozenset[TaskState | None] = frozenset({None})
ANY_TASK: frozenset[TaskState | None] = frozenset({None, *TaskState})
ANY_VM: frozenset[VmState] = frozenset(VmState) - {V.DELETED}


def resolve(result: VmState | Result, start: VmState, power: PowerState, previous: VmState | None) -> VmState:
    """Return the vm_state a success ends in: the one place a ``Result`` is given meaning."""
    if isinstance(result, VmState):
        return result
    if result is Result.BY_POWER:
        return V.ACTIVE if power is PowerState.RUNNING else V.STOPPED
    if result is Result.PREVIOUS:
        return previous if previous in (V.ACTIVE, V.STOPPED) else V.ACTIVE
    if result is Result.SHELVED:
        return V.SHELVED_OFFLOADED if power is PowerState.NOSTATE else V.SHELVED
    return V.ACTIVE if start is V.ERROR else start  # Result.REBUILT


class Operation(NamedTuple):
    """One row of the operations table (a named tuple: a dataclass would cost ``--help`` its import)."""

    name: str
    allowed_vm_states: frozenset[VmState]
    walk: tuple[TaskState, ...]
    result: VmState | Result
    end_power: PowerState | None = None
    """Power the guest is expected to have afterwards; None: whatever it reports."""
    allowed_task_states: frozenset[TaskState | None] = IDLE
    failure: Failure = Failure.REVERT_IF_UNCHANGED
    creates: bool = False
    """The operation brings the instance into existence (no vm_state guard)."""
    reschedules: bool = False
    """A failure in the last step may go back to the first one on another host (create)."""
    moves: bool = False
    """The operation moves the instance to another host (resize, migrate): it is scheduled first."""
    move_family: bool = False
    """The operation belongs to a move (moving, confirming or reverting it): the source keeps a disk."""
    note: str = ""
    """Where and why this row differs from Nova."""
    may_end_after: TaskState | None = None
    """A success may also end after this step of the walk, short of its last (shelve when it keeps the host)."""
    needs_host: bool = True
    """False: it runs on an instance without a host, or whose failed move is still open, as what is always left
    (delete); no room is claimed for it."""
    holds_room: bool = True
    """The instance still uses its room on its host afterwards, so from error or soft_deleted (which may hold no
    claim) it takes its claim there first. False for what ends the instance, keeps it off or takes it elsewhere."""
    reverts_move: bool = False
    """It may also run from error on the open move a failure left, putting the instance back on the move's source
    (revert_resize); never started by a timer then."""
    takeover: Takeover | None = None
    """Its preemption class: what it does about a late driver call of a task it takes over (None: takes none over)."""
    lock_applies: bool = True
    """A locked instance refuses it when the API starts it (create has no instance to lock yet)."""

    @property
    def preempts(self) -> frozenset[TaskState]:
        """The task_states this operation may cut short: those it is allowed from."""
        return frozenset(t for t in self.allowed_task_states if t is not None)

    def result_states(self, source: VmState | None = None) -> frozenset[VmState]:
        """Every vm_state a success of this operation can end in (from ``source``, or from any source)."""
        sources = [source] if source is not None else [V.BUILDING] if self.creates else self.allowed_vm_states
        return frozenset(
            resolve(self.result, start, power, previous)
            for start in sources
            for power in PowerState
            for previous in (None, *VmState)
        )

    def failure_states(self, source: VmState) -> frozenset[VmState]:
        """Every vm_state a failure of this operation started from ``source`` can end in."""
        if self.failure is Failure.ERROR:
            return frozenset({V.ERROR})
        if self.failure is Failure.ACTIVE_IF_RUNNING:
            return frozenset({V.ACTIVE, V.ERROR})
        return frozenset({source, V.ERROR})
