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
its row with :func:`register`, checked as the table is. The row type and its
vocabularies are in :mod:`lifecycle.graph_types`, the rows in
:mod:`lifecycle.graph_rows`; this module re-exports both and holds the table
in force, its checks, its renderings and the machines.

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

import functools
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lifecycle.errors import InvalidState
from lifecycle.graph_rows import DATA_LOSS, OPERATIONS
from lifecycle.graph_types import ANY_TASK, ANY_VM, IDLE, Failure, Op, Operation, Result, Takeover, resolve
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

V = VmState

_BY_NAME: dict[str, Operation] = {op.name: op for op in OPERATIONS}
"""The table in force: the rows of :data:`OPERATIONS`, and any registered since (:func:`register`)."""

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
    from lifecycle.logs import quiet_transitions  # not at import: the CLI's graph and --help load no structlog

    quiet_transitions()
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
    dest = resolve(op.result, start, power, previous) if succeeded else _failure_dest(op, start, power, before_power)
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
