"""The statements every write transaction is made of: the compare-and-swap, steps, preemption, the audit row.

Each takes the transaction's connection, so a write's statements commit or
roll back together.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any, NamedTuple, NoReturn

import sqlalchemy as sa

from lifecycle.audit import Why
from lifecycle.errors import Conflict, Fenced, Preempted
from lifecycle.records import Instance, Outcome, Task
from lifecycle.store._rows import AUDITS, FLAVOR_COLUMNS, INSTANCES, STEPS, TASKS, instance_values, state_value

__all__ = [
    "TASK_AT_EPOCH",
    "TASK_STATUS",
    "NewStep",
    "StepEnd",
    "actual",
    "audit",
    "audit_values",
    "cas",
    "changed",
    "close_steps",
    "expect",
    "fenced",
    "lost",
    "open_step",
    "preempt",
    "still_ours",
]

_I, _T, _S, _A = INSTANCES, TASKS, STEPS, AUDITS

# The statements of every write, built once: building an expression and its cache key at each call cost
# about a fifth of the engine's client CPU per operation (bench/storm.py). The SET clause of an UPDATE
# comes from the parameter names of each call (SQLAlchemy compiles and caches one form per set of columns);
# the x_ parameters are the WHERE clause's.
_CAS = sa.update(_I).where(
    _I.c.uuid == sa.bindparam("x_uuid"),
    _I.c.version == sa.bindparam("x_version"),
    _I.c.vm_state == sa.bindparam("x_vm_state"),
    _I.c.task_state.is_not_distinct_from(sa.bindparam("x_task_state", type_=_I.c.task_state.type)),
    _I.c.task_id.is_not_distinct_from(sa.bindparam("x_task_id", type_=_I.c.task_id.type)),
)
TASK_AT_EPOCH = sa.update(_T).where(_T.c.id == sa.bindparam("x_id"), _T.c.epoch == sa.bindparam("x_epoch"))
"""A worker's write of its task row, only at the epoch it holds (SET from the call's parameters)."""
TASK_STATUS = sa.select(_T.c.outcome, _T.c.preempted_by, _T.c.epoch).where(_T.c.id == sa.bindparam("x_id"))
"""Whether a task still runs, who preempted it, and its epoch."""
_CLOSE_STEPS = sa.update(_S).where(_S.c.task_id == sa.bindparam("x_task_id"), _S.c.finished_at.is_(None))
_INSERT_STEP = sa.insert(_S)
_INSERT_AUDIT = sa.insert(_A)


class NewStep(NamedTuple):
    """A step a write opens in its task's step log."""

    seq: int
    name: str
    started_at: datetime


class StepEnd(NamedTuple):
    """How a write closes its task's open steps."""

    finished_at: datetime
    result: str
    detail: str | None


def cas(conn: sa.Connection, expected: Instance, after: Instance, task: Task | None) -> None:
    """Write ``after`` over the instance row if it still matches ``expected``.

    Raises :class:`Fenced` or :class:`Preempted` when ``task`` lost its
    instance, :class:`Conflict` otherwise.
    """
    values = changed(expected, after)
    values["x_uuid"] = expected.uuid
    values["x_version"] = expected.version
    values["x_vm_state"] = expected.vm_state.value
    values["x_task_state"] = state_value(expected.task_state)
    values["x_task_id"] = expected.task_id
    if conn.execute(_CAS, values).rowcount != 1:
        lost(conn, expected, task)


def lost(conn: sa.Connection, expected: Instance, task: Task | None) -> None:
    """Raise why a compare-and-swap on ``expected`` matched no row: Fenced, Preempted or Conflict."""
    if task is not None:
        outcome, preempted_by, epoch = conn.execute(TASK_STATUS, {"x_id": task.id}).one()
        if epoch != task.epoch:
            raise Fenced(task.id, expected.uuid, task.epoch, epoch)
        if outcome == Outcome.PREEMPTED.value:
            raise Preempted(task.id, expected.uuid, preempted_by)
    raise Conflict(expected.uuid, expect(expected), actual(conn, expected.uuid))


def actual(conn: sa.Connection, uuid: str) -> dict[str, Any] | None:
    """Return the instance's compare-and-swap columns as stored (None if there is no row)."""
    query = sa.select(_I.c.version, _I.c.vm_state, _I.c.task_state, _I.c.task_id).where(_I.c.uuid == uuid)
    row = conn.execute(query).mappings().first()
    return None if row is None else dict(row)


def expect(instance: Instance) -> dict[str, Any]:
    """Return the compare-and-swap columns a writer expected."""
    return {
        "version": instance.version,
        "vm_state": instance.vm_state.value,
        "task_state": state_value(instance.task_state),
        "task_id": instance.task_id,
    }


_WRITABLE = (
    "vm_state",
    "task_state",
    "power_state",
    "task_id",
    "previous_vm_state",
    "version",
    "launched_at",
    "updated_at",
    "deleted_at",
    "host",
    "image",
    "missing_count",
    "locked_by",
    "locked_reason",
    "locked_at",
    "disk",
)


def changed(before: Instance, after: Instance) -> dict[str, Any]:
    """Return the instance columns a compare-and-swap from ``before`` to ``after`` sets (the version always)."""
    values = instance_values(after)
    changed = {k: values[k] for k in _WRITABLE if getattr(before, k) != getattr(after, k) or k == "version"}
    if before.flavor != after.flavor:  # a resize finishing or reverting
        changed |= {k: values[k] for k in FLAVOR_COLUMNS}
    return changed


def preempt(conn: sa.Connection, old: Task, new: Task) -> None:
    """Mark running task ``old`` preempted by ``new`` and close its open step."""
    conn.execute(
        sa.update(_T)
        .where(_T.c.id == old.id, _T.c.outcome == Outcome.RUNNING.value)
        .values(outcome=Outcome.PREEMPTED.value, preempted_by=new.id, finished_at=new.started_at)
    )
    close_steps(conn, old.id, new.started_at, "preempted", f"preempted by {new.operation} task {new.id}")


def open_step(conn: sa.Connection, task_id: str, seq: int, name: str, started_at: datetime) -> None:
    """Open step ``seq`` of a task's step log."""
    conn.execute(_INSERT_STEP, {"task_id": task_id, "seq": seq, "name": name, "started_at": started_at})


def close_steps(conn: sa.Connection, task_id: str, at: datetime, result: str, detail: str | None) -> None:
    """Close a task's open steps with ``result``."""
    conn.execute(_CLOSE_STEPS, {"x_task_id": task_id, "finished_at": at, "result": result, "detail": detail})


def still_ours(conn: sa.Connection, task: Task, values: dict[str, Any]) -> None:
    """Run a worker's task-row update only at the epoch it holds; else raise :class:`Fenced` (the write rolls back).

    The instance's compare-and-swap cannot tell a fenced worker from the
    recovering one (both hold the same task id); the epoch can.
    """
    done = conn.execute(TASK_AT_EPOCH, {**values, "x_id": task.id, "x_epoch": task.epoch}).rowcount
    if done != 1:
        fenced(conn, task)


def fenced(conn: sa.Connection, task: Task) -> NoReturn:
    """Raise :class:`Fenced`: the worker's task row is at another epoch than the one it holds."""
    current = conn.execute(sa.select(_T.c.epoch).where(_T.c.id == task.id)).scalar_one()
    raise Fenced(task.id, task.instance_uuid, task.epoch, current)


def audit(conn: sa.Connection, before: Instance | None, after: Instance, why: Why, *, always: bool = False) -> None:
    """Insert the audit row of a change, unless no state changed and not ``always``."""
    values = audit_values(before, after, why, always=always)
    if values is not None:
        conn.execute(_INSERT_AUDIT, values)


def audit_values(before: Instance | None, after: Instance, why: Why, *, always: bool = False) -> dict[str, Any] | None:
    """Return the audit row of a change, or None when no state changed and not ``always``."""
    if before is not None and before.host != after.host and why.message is None:
        why = replace(why, message=f"host {before.host or 'none'} -> {after.host or 'none'}")
    if (
        not always
        and before is not None
        and (before.vm_state, before.task_state, before.power_state)
        == (
            after.vm_state,
            after.task_state,
            after.power_state,
        )
    ):
        return None
    return {
        "instance_uuid": after.uuid,
        "task_id": why.task_id,
        "request_id": why.request_id,
        "actor": why.actor,
        "cause": why.cause.value,
        "operation": why.operation,
        "rule": why.rule,
        "from_vm_state": None if before is None else before.vm_state.value,
        "to_vm_state": after.vm_state.value,
        "from_task_state": None if before is None else state_value(before.task_state),
        "to_task_state": state_value(after.task_state),
        "from_power_state": None if before is None else int(before.power_state),
        "to_power_state": int(after.power_state),
        "message": why.message,
        "created_at": after.updated_at,
        "project_id": after.project_id,
        "user_id": after.user_id,
        # Where it happened: a change taking the instance off its host happened on that host.
        "host": after.host if after.host is not None or before is None else before.host,
    }
