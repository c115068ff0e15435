"""The operations table, and the state machines built from it once, when first used.

``OPERATIONS`` is the single source of truth for guards: which vm_states and
task_states each operation is allowed from, the task_states it walks through,
where it ends and what a failure does, and the data the runner, recovery and
preemption read instead of naming operations (its preemption class, whether
it needs a host, keeps its room, reverts a move, whether the lock applies).
The engine, the CLI's ``graph`` command, the README diagram and the tests
all read it. A row is half of an operation's one record; the other half is
its definition in :mod:`lifecycle.operations` (:mod:`lifecycle.registry`).
:class:`Op` names the rows; an operation defined elsewhere (a test's) adds
its row with :func:`register`, checked as the table is.

Two model-less ``transitions`` machines are built from the table, one per state
dimension that operations drive (vm_state and task_state). They are fired on
throw-away cursors, never bound to rows: one shared machine costs nothing,
one machine per instance costs seconds and hundreds of MiB at 10,000 rows.
``transitions`` does not check a chart; :func:`check_table` does, before the
machines are built (so before any operation's guard is checked): every state
is reachable (or explicitly reserved), every task_state has a success, a
failure and a preemption exit, and ``deleted`` is terminal. Neither runs on
import: the CLI's ``--help``, ``graph`` and reads need only the table.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from lifecycle.errors import InvalidState
from lifecycle.states import PowerState, TaskState, VmState

if TYPE_CHECKING:
    from transitions import Machine

__all__ = [
    "ANY_TASK",
    "ANY_VM",
    "DATA_LOSS",
    "IDLE",
    "MOVE_TASK_STATES",
    "OPERATIONS",
    "Failure",
    "Op",
    "Operation",
    "Result",
    "Takeover",
    "begin",
    "check_table",
    "end_vm_state",
    "next_task_state",
    "operation",
    "register",
    "retry_task_state",
    "rows",
    "to_json",
    "to_mermaid",
    "unregister",
]

V, T = VmState, TaskState


class Op(enum.StrEnum):
    """The name of each operation of the table, as tasks, audit rows and the change feed store it.

    Stored values are frozen: add members, never rename. An operation added
    at run time (:func:`register`) has a plain string name instead.
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

# Nova's task_states.ALLOW_REBOOT: a hard reboot may take over these tasks.
_ALLOW_HARD_REBOOT_TASKS: frozenset[TaskState | None] = frozenset(
    {
        None,
        T.REBOOTING,
        T.REBOOT_PENDING,
        T.REBOOT_STARTED,
        T.RESUMING,
        T.REBOOTING_HARD,
        T.UNPAUSING,
        T.PAUSING,
        T.SUSPENDING,
    }
)


def _resolve(result: VmState | Result, start: VmState, power: PowerState, previous: VmState | None) -> VmState:
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
            _resolve(self.result, start, power, previous)
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


_MOVE_FROM = frozenset({V.ACTIVE, V.STOPPED})
_RESIZE_WALK = (T.RESIZE_PREP, T.RESIZE_MIGRATING, T.RESIZE_MIGRATED, T.RESIZE_FINISH)
DATA_LOSS = "rebuilt from its image on the new host: data on the dead host's disk is lost"
"""What every evacuation means for the guest's disk: the one sentence the engine, the CLI and the docs say."""
_DELETE_NOTE = (
    "Nova ignores a second delete while one is running (pain point 3: a lost RPC left it "
    "stuck); here a delete takes over any task, a running delete included."
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "create",
        frozenset(),
        (T.SCHEDULING, T.NETWORKING, T.BLOCK_DEVICE_MAPPING, T.SPAWNING),
        V.ACTIVE,
        PowerState.RUNNING,
        failure=Failure.ERROR,
        creates=True,
        reschedules=True,
        lock_applies=False,
        note="Nova passes through task NULL between scheduling and networking; "
        "the task owns the instance throughout here, so there is no idle gap.",
    ),
    Operation("start", frozenset({V.STOPPED}), (T.POWERING_ON,), V.ACTIVE, PowerState.RUNNING),
    Operation(
        "force_stop",
        frozenset({V.STOPPED, V.PAUSED}),
        (T.POWERING_OFF,),
        V.STOPPED,
        PowerState.SHUTDOWN,
        note="Nova's compute_api.force_stop, used by the power sync for a stopped guest found running "
        "and a paused guest found off; Nova applies no vm_state check, we admit only those two.",
    ),
    Operation("stop", frozenset({V.ACTIVE, V.ERROR}), (T.POWERING_OFF,), V.STOPPED, PowerState.SHUTDOWN),
    Operation(
        "reboot",
        frozenset({V.ACTIVE}),
        (T.REBOOTING, T.REBOOT_PENDING, T.REBOOT_STARTED),
        V.ACTIVE,
        PowerState.RUNNING,
    ),
    Operation(
        "reboot_hard",
        frozenset({V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED, V.ERROR}),
        (T.REBOOTING_HARD, T.REBOOT_PENDING_HARD, T.REBOOT_STARTED_HARD),
        V.ACTIVE,
        PowerState.RUNNING,
        allowed_task_states=_ALLOW_HARD_REBOOT_TASKS,
        failure=Failure.ACTIVE_IF_RUNNING,
        takeover=Takeover.BY_POWER,
    ),
    Operation("pause", frozenset({V.ACTIVE}), (T.PAUSING,), V.PAUSED, PowerState.PAUSED),
    Operation("unpause", frozenset({V.PAUSED}), (T.UNPAUSING,), V.ACTIVE, PowerState.RUNNING),
    Operation("suspend", frozenset({V.ACTIVE}), (T.SUSPENDING,), V.SUSPENDED),
    Operation("resume", frozenset({V.SUSPENDED}), (T.RESUMING,), V.ACTIVE, PowerState.RUNNING),
    Operation("rescue", frozenset({V.ACTIVE, V.STOPPED, V.ERROR}), (T.RESCUING,), V.RESCUED, PowerState.RUNNING),
    Operation("unrescue", frozenset({V.RESCUED}), (T.UNRESCUING,), V.ACTIVE, PowerState.RUNNING),
    Operation("resize", _MOVE_FROM, _RESIZE_WALK, V.RESIZED, moves=True, move_family=True),
    Operation("migrate", _MOVE_FROM, _RESIZE_WALK, V.RESIZED, moves=True, move_family=True),
    Operation(
        "confirm_resize",
        frozenset({V.RESIZED}),
        (T.RESIZE_CONFIRMING,),
        Result.BY_POWER,
        move_family=True,
        note="Nova defines resize_confirming but never sets it and tracks confirm only on the "
        "migration record; here confirm is a task like any other, so it is visible and recoverable.",
    ),
    Operation(
        "revert_resize",
        frozenset({V.RESIZED, V.ERROR}),
        (T.RESIZE_REVERTING,),
        Result.PREVIOUS,
        move_family=True,
        reverts_move=True,
        note="Nova reverts only a resized instance; here also an error one whose move failed after its disk left "
        "the source and is still open (the runner refuses it otherwise): the source's kept disk is put back, with the "
        "old flavor and the vm_state from before the move, and the destination's copy and claim go.",
    ),
    Operation(
        "rebuild",
        frozenset({V.ACTIVE, V.STOPPED, V.ERROR}),
        (T.REBUILDING, T.REBUILD_BLOCK_DEVICE_MAPPING, T.REBUILD_SPAWNING),
        Result.REBUILT,
    ),
    Operation(
        "evacuate",
        frozenset({V.ACTIVE, V.STOPPED, V.ERROR}),
        (T.REBUILDING, T.REBUILD_BLOCK_DEVICE_MAPPING, T.REBUILD_SPAWNING),
        Result.REBUILT,
        failure=Failure.ERROR,
        holds_room=False,
        note="Nova's evacuate skips the task check; here it needs an idle instance (a task stuck on the dead "
        "host ends by itself once its connection fails, or by reset-state), so only delete and force_delete "
        "ever take it over. Its host must be down and fenced (lifecycle.evacuation), not only down, and it is "
        + DATA_LOSS
        + ".",
    ),
    Operation(
        "delete",
        ANY_VM,
        (T.DELETING,),
        V.DELETED,
        PowerState.NOSTATE,
        allowed_task_states=ANY_TASK,
        failure=Failure.ERROR,
        needs_host=False,
        holds_room=False,
        takeover=Takeover.DESTROY_LATE,
        note=_DELETE_NOTE,
    ),
    Operation(
        "force_delete",
        ANY_VM,
        (T.DELETING,),
        V.DELETED,
        PowerState.NOSTATE,
        allowed_task_states=ANY_TASK,
        failure=Failure.ERROR,
        needs_host=False,
        holds_room=False,
        takeover=Takeover.DESTROY_LATE,
        note="Same path as delete, but the guest is destroyed at once with no clean shutdown. " + _DELETE_NOTE,
    ),
    Operation(
        "soft_delete",
        ANY_VM - {V.SOFT_DELETED, V.SHELVED_OFFLOADED},
        (T.SOFT_DELETING,),
        V.SOFT_DELETED,
        PowerState.SHUTDOWN,
        holds_room=False,
        note="Nova lets soft delete overwrite any running task; here only delete and force_delete take "
        "over a running task (a soft delete is restorable, so it must not cut a task short): it needs an "
        "idle instance. An offloaded instance has no guest to keep: its delete is a delete, as Nova's local delete.",
    ),
    Operation("restore", frozenset({V.SOFT_DELETED}), (T.RESTORING,), V.ACTIVE, PowerState.RUNNING),
    Operation(
        "shelve",
        frozenset({V.ACTIVE, V.STOPPED, V.PAUSED, V.SUSPENDED}),
        (T.SHELVING, T.SHELVING_IMAGE_PENDING_UPLOAD, T.SHELVING_IMAGE_UPLOADING, T.SHELVING_OFFLOADING),
        Result.SHELVED,
        may_end_after=T.SHELVING_IMAGE_UPLOADING,
        note="As Nova: the offload is part of the shelve when shelved_offload_time is 0 (the walk goes on to "
        "shelving_offloading and ends shelved_offloaded), else the walk ends after the upload, shelved. A failed "
        "snapshot powers a guest that was running back on, so its vm_state is kept.",
    ),
    Operation(
        "shelve_offload",
        frozenset({V.SHELVED}),
        (T.SHELVING_OFFLOADING,),
        V.SHELVED_OFFLOADED,
        PowerState.NOSTATE,
    ),
    Operation(
        "unshelve",
        frozenset({V.SHELVED, V.SHELVED_OFFLOADED}),
        (T.UNSHELVING, T.SPAWNING),
        V.ACTIVE,
        PowerState.RUNNING,
        note="Nova starts a shelved (not offloaded) instance through start_instance (powering-on); here both "
        "kinds walk unshelving -> spawning, the offloaded one scheduled and spawned from its snapshot.",
    ),
)

if {op.name for op in OPERATIONS} != set(Op):
    raise AssertionError("Op must name exactly the operations of the table")  # a definition error, found at import

_BY_NAME: dict[str, Operation] = {op.name: op for op in OPERATIONS}
"""The table in force: the rows above, and any registered since (:func:`register`)."""

MOVE_OPERATIONS = tuple(op.name for op in OPERATIONS if op.move_family)
MOVE_TASK_STATES: frozenset[TaskState] = frozenset(t for name in MOVE_OPERATIONS for t in _BY_NAME[name].walk)
"""Task states during which an instance's move is open (its source keeps ``<uuid>_resize``)."""

# vm_states no operation enters yet: kept in the vocabulary so Nova-written rows
# load, exempted from the reachability check by name rather than silently.
RESERVED_VM_STATES: frozenset[VmState] = frozenset()

_IDLE_NAME = "idle"
_NEW_NAME = "new"


def _task_name(state: TaskState | None) -> str:
    return _IDLE_NAME if state is None else state.value


def operation(name: str) -> Operation:
    """Return the table row for ``name``; a ``KeyError`` names the known operations."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown operation {name!r}; known: {', '.join(sorted(_BY_NAME))}") from None


def rows() -> tuple[Operation, ...]:
    """Return the table in force: :data:`OPERATIONS` and the rows registered since, in that order."""
    return tuple(_BY_NAME.values())


def register(row: Operation) -> None:
    """Add the row of an operation defined outside :data:`OPERATIONS` (a test's, an embedder's).

    The table with it is checked as the table is (:func:`check_table`), and the
    machines are built anew at their next use. Meant for start-up, before tasks run.
    """
    if row.name in _BY_NAME:
        raise ValueError(f"operation {row.name!r} is in the table already")
    check_table((*rows(), row))
    _BY_NAME[row.name] = row
    _machines.cache_clear()


def unregister(name: str) -> None:
    """Remove a row :func:`register` added (the rows of :data:`OPERATIONS` stay)."""
    if any(op.name == name for op in OPERATIONS):
        raise ValueError(f"operation {name!r} is part of the table itself")
    if _BY_NAME.pop(name, None) is not None:
        _machines.cache_clear()


def _dest_is(dest: str) -> Any:
    def condition(*_args: Any, **kwargs: Any) -> bool:
        return bool(kwargs.get("dest") == dest)

    return condition


def _vm_machine() -> Machine:
    from transitions import Machine

    machine = Machine(
        model=None,
        states=[_NEW_NAME, *(s.value for s in VmState)],
        initial=_NEW_NAME,
        auto_transitions=False,
        model_attribute="vm_state",
    )
    for op in rows():
        sources = [_NEW_NAME] if op.creates else sorted(s.value for s in op.allowed_vm_states)
        for source in sources:
            ends = op.result_states() if op.creates else op.result_states(VmState(source))
            for dest in sorted(ends):
                machine.add_transition(op.name, source, dest.value, conditions=[_dest_is(dest.value)])
            fail_from = V.BUILDING if op.creates else VmState(source)
            for dest in sorted(op.failure_states(fail_from)):
                machine.add_transition(f"{op.name}.fail", source, dest.value, conditions=[_dest_is(dest.value)])
    return machine


def _task_machine() -> Machine:
    from transitions import Machine

    machine = Machine(
        model=None,
        states=[_task_name(None), *(t.value for t in TaskState)],
        initial=_IDLE_NAME,
        auto_transitions=False,
        model_attribute="task_state",
    )
    for op in rows():
        first = op.walk[0].value
        task_sources: list[Any] = sorted(_task_name(t) for t in op.allowed_task_states)
        machine.add_transition(f"{op.name}.begin", task_sources, first)
        for here, there in zip(op.walk, op.walk[1:], strict=False):
            machine.add_transition(f"{op.name}.step", here.value, there.value)
        machine.add_transition(f"{op.name}.finish", op.walk[-1].value, _IDLE_NAME)
        if op.may_end_after is not None:
            machine.add_transition(f"{op.name}.finish", op.may_end_after.value, _IDLE_NAME)
        if op.reschedules:
            machine.add_transition(f"{op.name}.retry", op.walk[-1].value, first)
        walked: list[Any] = [t.value for t in op.walk]
        machine.add_transition(f"{op.name}.fail", walked, _IDLE_NAME)
    return machine


@functools.cache
def _machines() -> tuple[Machine, Machine]:
    """Check the table, then build the vm_state and task_state machines (once, at the first guard or step)."""
    check_table(rows())
    return _vm_machine(), _task_machine()


def _vm() -> Machine:
    return _machines()[0]


def _task() -> Machine:
    return _machines()[1]


class _Cursor:
    """A throw-away model the shared machines are fired on."""

    __slots__ = ("task_state", "vm_state")

    def __init__(self, vm_state: str, task_state: str) -> None:
        self.vm_state = vm_state
        self.task_state = task_state


def _fire(machine: Machine, event: str, cursor: _Cursor, **kwargs: Any) -> bool:
    from transitions import MachineError

    try:
        return bool(machine.events[event].trigger(cursor, **kwargs))
    except (MachineError, KeyError):
        return False


def begin(name: str, uuid: str, vm_state: VmState | None, task_state: TaskState | None) -> TaskState:
    """Check the guard of operation ``name`` and return its first task_state.

    ``vm_state`` is None only for an operation that creates the instance.
    Raises :class:`InvalidState` naming what is allowed when the guard refuses.
    """
    op = operation(name)
    vm = _NEW_NAME if vm_state is None else vm_state.value
    cursor = _Cursor(vm, _task_name(task_state))
    vm_ok = op.creates == (vm_state is None) and _any_vm_transition(op.name, vm)
    if not (vm_ok and _fire(_task(), f"{name}.begin", cursor)):
        raise InvalidState(name, uuid, vm_state, task_state, op.allowed_vm_states, op.allowed_task_states)
    return TaskState(cursor.task_state)


def _any_vm_transition(event: str, source: str) -> bool:
    ev = _vm().events.get(event)
    return ev is not None and source in ev.transitions


def next_task_state(name: str, current: TaskState) -> TaskState | None:
    """Return the task_state after ``current`` in the walk, or None after the last one."""
    cursor = _Cursor("", current.value)
    if _fire(_task(), f"{name}.step", cursor):
        return TaskState(cursor.task_state)
    if _fire(_task(), f"{name}.finish", cursor):
        return None
    raise ValueError(f"{current.value} is not part of the {name} walk")


def retry_task_state(name: str, current: TaskState) -> TaskState:
    """Return the task_state a rescheduling operation goes back to from ``current``."""
    cursor = _Cursor("", current.value)
    if not _fire(_task(), f"{name}.retry", cursor):
        raise ValueError(f"{name} cannot go back from {current.value}")
    return TaskState(cursor.task_state)


def end_vm_state(
    name: str,
    source: VmState | None,
    *,
    succeeded: bool,
    power: PowerState,
    before_power: PowerState | None = None,
    previous: VmState | None = None,
) -> VmState:
    """Return the vm_state operation ``name`` ends in, checked against the machine.

    ``power`` is the guest's power read after the operation; ``before_power``
    the one read before it (a failure with unchanged power keeps the vm_state);
    ``previous`` the vm_state stashed before a move (revert_resize).
    """
    op = operation(name)
    start = source if source is not None else V.BUILDING
    dest = _resolve(op.result, start, power, previous) if succeeded else _failure_dest(op, start, power, before_power)
    cursor = _Cursor(_NEW_NAME if source is None else source.value, "")
    event = name if succeeded else f"{name}.fail"
    if not _fire(_vm(), event, cursor, dest=dest.value):
        raise AssertionError(f"{event} from {cursor.vm_state} to {dest.value} is not in the graph")
    return dest


def _failure_dest(op: Operation, start: VmState, power: PowerState, before_power: PowerState | None) -> VmState:
    if op.failure is Failure.ERROR:
        return V.ERROR
    if op.failure is Failure.ACTIVE_IF_RUNNING:
        return V.ACTIVE if power is PowerState.RUNNING else V.ERROR
    return start if power == before_power else V.ERROR


def check_table(operations: Iterable[Operation] = OPERATIONS) -> None:
    """Raise ``ValueError`` listing every defect of an operations table.

    Checked: unique names; every vm_state reachable from creation unless
    reserved; every task_state walked by some operation; every task_state has a
    success exit, a failure exit and a preemption exit (an operation allowed
    from it); an operation preempts tasks exactly when it has a preemption
    class; nothing leaves ``deleted``.
    """
    ops = list(operations)
    problems: list[str] = []
    names = [op.name for op in ops]
    problems += [f"operation {n!r} is defined twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += _unreachable_vm_states(ops)
    walked = {t for op in ops for t in op.walk}
    problems += [f"task_state {t.value} is walked by no operation" for t in TaskState if t not in walked]
    for t in sorted(walked):
        preemptors = [op.name for op in ops if t in op.preempts]
        if not preemptors:
            problems.append(f"task_state {t.value} has no preemption exit")
    problems += [
        f"operation {op.name} preempts tasks but has no preemption class (takeover)"
        for op in ops
        if op.preempts and op.takeover is None
    ]
    problems += [
        f"operation {op.name} has a preemption class but preempts no task"
        for op in ops
        if op.takeover is not None and not op.preempts
    ]
    problems += [
        f"operation {op.name} is allowed from deleted, which must be terminal"
        for op in ops
        if V.DELETED in op.allowed_vm_states
    ]
    problems += [f"operation {op.name} has an empty walk" for op in ops if not op.walk]
    if problems:
        raise ValueError("invalid operations table:\n  " + "\n  ".join(problems))


def _unreachable_vm_states(ops: list[Operation]) -> list[str]:
    reached: set[VmState] = set()
    frontier = [V.BUILDING]
    for op in ops:
        if op.creates:
            frontier += sorted(op.result_states() | op.failure_states(V.BUILDING))
    while frontier:
        state = frontier.pop()
        if state in reached:
            continue
        reached.add(state)
        for op in ops:
            if state in op.allowed_vm_states:
                frontier += sorted(op.result_states() | op.failure_states(state))
    missing = set(VmState) - reached - RESERVED_VM_STATES
    return [f"vm_state {s.value} is unreachable" for s in sorted(missing)]


def _states_json(states: Iterable[object]) -> list[str | None]:
    values = [None if s is None else str(s) for s in states]
    return sorted(values, key=lambda v: "" if v is None else v)


def to_json() -> str:
    """Return the operations table as JSON (the graph, as data)."""
    table = [
        {
            "operation": op.name,
            "allowed_vm_states": _states_json(op.allowed_vm_states),
            "allowed_task_states": _states_json(op.allowed_task_states),
            "walk": [t.value for t in op.walk],
            "result": op.result.value,
            "result_states": _states_json(op.result_states()),
            "end_power_state": None if op.end_power is None else int(op.end_power),
            "failure": op.failure.value,
            "creates": op.creates,
            "reschedules": op.reschedules,
            "note": op.note,
        }
        for op in rows()
    ]
    return json.dumps(table, indent=2)


def to_mermaid() -> str:
    """Return the vm_state graph as a mermaid state diagram, one edge per operation."""
    lines = ["stateDiagram-v2"]
    edges: dict[tuple[str, str], list[str]] = {}
    for op in rows():
        sources = ["[*]"] if op.creates else sorted(s.value for s in op.allowed_vm_states)
        for source in sources:
            start = V.BUILDING if op.creates else VmState(source)
            for dest in sorted(op.result_states(None if op.creates else start)):
                edges.setdefault((source, dest.value), []).append(op.name)
    for (left, right), ops in sorted(edges.items()):
        lines.append(f"    {_node(left)} --> {_node(right)}: {', '.join(ops)}")
    lines.append(f"    {_node(V.DELETED.value)} --> [*]")
    return "\n".join(lines) + "\n"


def _node(name: str) -> str:
    return name if name == "[*]" else name.replace("-", "_")
