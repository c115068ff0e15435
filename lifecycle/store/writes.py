"""The compare-and-swap writes of a task's life: create, begin, advance, finish, and the idle-instance writes.

Every state write is one transaction holding a conditional UPDATE of the
instance on its expected (version, vm_state, task_state, task_id), the task and
step-log statements that go with it, and one audit row when any of the three
states changed. An UPDATE that matches no row raises: :class:`Preempted` when
the writer's own task was taken over, :class:`Conflict` otherwise. On
PostgreSQL a task's create, begin, advance and finish send that transaction's
statements as one (:mod:`lifecycle.store._pg`); SQLite sends them one by one.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from lifecycle.audit import Why
from lifecycle.errors import AlreadyExists, Conflict, Fenced, NoValidHost
from lifecycle.records import Instance, Migration, Outcome, Task
from lifecycle.states import PowerState, TaskState, VmState
from lifecycle.store import _pg
from lifecycle.store._base import StoreBase, retry_on_deadlock
from lifecycle.store._cas import (
    TASK_AT_EPOCH,
    actual,
    audit,
    audit_values,
    cas,
    changed,
    close_steps,
    expect,
    lost,
    open_step,
)
from lifecycle.store._cas import preempt as mark_preempted
from lifecycle.store._rows import (
    INSTANCES,
    MIGRATIONS,
    TASKS,
    instance_from,
    instance_values,
    migration_values,
    task_values,
)
from lifecycle.store.claims import Hold, hold, release_all

__all__ = ["Writes"]

_I, _T = INSTANCES, TASKS
_INSERT_TASK = sa.insert(_T)
_LOCK_INSTANCE = sa.select(_I).where(_I.c.uuid == sa.bindparam("x_uuid")).with_for_update()
"""The instance's row, locked until the transaction ends (PostgreSQL; SQLite's writes are serialized anyway)."""


class Writes(StoreBase):
    """Instance state changes, each with its task, step and audit rows in the same transaction."""

    @retry_on_deadlock
    def create(self, instance: Instance, task: Task, step: str, why: Why) -> Instance:
        """Insert a new instance already owned by ``task``, with its first step and audit row."""
        try:
            with self.engine.begin() as conn:
                if self.one_statement:
                    _pg.write(
                        conn,
                        _pg.Parts(
                            instance_values(instance),
                            task_id=task.id,
                            new_task=task_values(task),
                            open=_opened(1, step, self.clock.now()),
                            audit=audit_values(None, instance, why),
                        ),
                    )
                else:
                    conn.execute(sa.insert(_I), instance_values(instance))
                    conn.execute(_INSERT_TASK, task_values(task))
                    open_step(conn, task.id, 1, step, self.clock.now())
                    audit(conn, None, instance, why)
        except IntegrityError:
            raise AlreadyExists("instance", instance.uuid) from None
        return instance

    @retry_on_deadlock
    def begin(
        self,
        expected: Instance,
        task: Task,
        task_state: TaskState,
        why: Why,
        preempt: Task | None,
        *,
        claim: Hold | None = None,
    ) -> Instance:
        """Start ``task`` on ``expected``: task row, first task_state, step and audit row.

        With ``preempt``, that running task is marked preempted by this one and
        its open step closed, in the same transaction. With ``claim``, the
        instance must hold that claim (one missing is taken, within the host's
        ratios): when it cannot, :class:`NoValidHost` is raised and nothing is
        written.
        """
        after = replace(
            expected, task_state=task_state, task_id=task.id, version=expected.version + 1, updated_at=task.started_at
        )
        try:
            with self.engine.begin() as conn:
                if self.one_statement and preempt is None and claim is None:
                    parts = _pg.Parts(
                        changed(expected, after),
                        _expected(expected),
                        task_id=task.id,
                        new_task=task_values(task),
                        open=_opened(1, task_state.value, self.clock.now()),
                        audit=audit_values(expected, after, why, always=True),
                    )
                    if _pg.write(conn, parts)[0] != 1:
                        lost(conn, expected, None)
                    return after
                # Lock order: the instance row first, then task rows, in every write
                # (a worker's finish does the same), so PostgreSQL never deadlocks on them.
                cas(conn, expected, after, None)
                _hold(conn, expected.uuid, claim, self.clock.now())
                if preempt is not None:
                    mark_preempted(conn, preempt, task)
                conn.execute(_INSERT_TASK, task_values(task))
                open_step(conn, task.id, 1, task_state.value, self.clock.now())
                # Always audited: a takeover (hard reboot over hard reboot) may change no state, only the task.
                audit(conn, expected, after, why, always=True)
        except IntegrityError:
            # The one-running-task index: another task started on this instance first.
            with self._read() as reader:
                stored = actual(reader, expected.uuid)
            raise Conflict(expected.uuid, expect(expected), stored) from None
        return after

    @retry_on_deadlock
    def advance(
        self,
        expected: Instance,
        task: Task,
        seq: int,
        task_state: TaskState,
        why: Why,
        *,
        retried: bool = False,
        **fields: Any,
    ) -> Instance:
        """Move ``task`` to its next task_state (with ``fields``, e.g. host); close step ``seq - 1``, open ``seq``.

        The closed step's result is ``ok``, or ``retried`` when the task goes back to
        the first step of its walk (a reschedule); ``why.message`` is kept on it either way.
        """
        at = self.clock.now()
        after = replace(expected, task_state=task_state, version=expected.version + 1, updated_at=at, **fields)
        result = "retried" if retried else "ok"
        with self.engine.begin() as conn:
            if self.one_statement:
                closed = {"finished_at": at, "result": result, "detail": why.message}
                set_task = {"lease_expires_at": at + self.lease}
                _worker_write(
                    conn,
                    expected,
                    after=after,
                    task=task,
                    why=why,
                    task_set=set_task,
                    closed=closed,
                    opened=_opened(seq, task_state.value, at),
                )
                return after
            cas(conn, expected, after, task)
            close_steps(conn, task.id, at, result, why.message)
            open_step(conn, task.id, seq, task_state.value, at)
            _still_ours(conn, task, lease_expires_at=at + self.lease)
            audit(conn, expected, after, why)
        return after

    @retry_on_deadlock
    def finish(
        self,
        expected: Instance,
        task: Task,
        *,
        vm_state: VmState,
        power_state: PowerState,
        outcome: Outcome,
        why: Why,
        error: str | None = None,
        traceback: str | None = None,
        **fields: Any,
    ) -> Instance:
        """End ``task``: final states, task idle, task row closed, step closed, audit row."""
        at = self.clock.now()
        after = replace(
            expected,
            vm_state=vm_state,
            task_state=None,
            task_id=None,
            power_state=power_state,
            version=expected.version + 1,
            updated_at=at,
            **fields,
        )
        step_result = "ok" if outcome is Outcome.SUCCEEDED else "failed"
        ended = {"outcome": outcome.value, "finished_at": at, "error": error, "traceback": traceback}
        with self.engine.begin() as conn:
            if self.one_statement:
                closed = {"finished_at": at, "result": step_result, "detail": error}
                _worker_write(
                    conn,
                    expected,
                    after=after,
                    task=task,
                    why=why,
                    task_set={**ended, "lease_expires_at": at},
                    closed=closed,
                    opened=None,
                )
                return after
            cas(conn, expected, after, task)
            close_steps(conn, task.id, at, step_result, error)
            _still_ours(conn, task, **ended, lease_expires_at=at)
            audit(conn, expected, after, why)
        return after

    def note(self, instance: Instance, why: Why) -> None:
        """Write an audit row that changes no state (something done on the hypervisor for this instance).

        The row chains from the instance as it is when the note is written (read and locked in the same
        transaction), not as the caller last read it: a worker taken over meanwhile may still note what its
        late call destroyed, and its note must not claim the states from before the takeover.
        """
        with self.engine.begin() as conn:  # stamped now, when the thing it records was done
            row = conn.execute(_LOCK_INSTANCE, {"x_uuid": instance.uuid}).mappings().first()
            current = instance if row is None else instance_from(row)
            audit(conn, current, replace(current, updated_at=self.clock.now()), why, always=True)

    @retry_on_deadlock
    def mark_error(self, expected: Instance, power_state: PowerState, why: Why) -> Instance:
        """Set vm_state error on an idle instance (a sync rule), with its audit row."""
        after = replace(
            expected,
            vm_state=VmState.ERROR,
            power_state=power_state,
            version=expected.version + 1,
            updated_at=self.clock.now(),
        )
        with self.engine.begin() as conn:
            cas(conn, expected, after, None)
            audit(conn, expected, after, why)
        return after

    @retry_on_deadlock
    def set_lock(self, expected: Instance, locked_by: str | None, reason: str | None, why: Why) -> Instance:
        """Lock (``locked_by`` an actor) or unlock (None) an instance, with an audit row saying who and why.

        Only the lock columns change, compared with what the caller read (so
        two lockers cannot both win) but not the version: a task running on
        the instance keeps its compare-and-swap valid and runs to its end. An
        operation that read the instance unlocked just before the lock may
        still start (check, then act, as Nova's lock).
        """
        at = self.clock.now()
        after = replace(
            expected, locked_by=locked_by, locked_reason=reason, locked_at=at if locked_by is not None else None
        )
        query = (
            sa.update(_I)
            .where(_I.c.uuid == expected.uuid, _I.c.locked_by.is_not_distinct_from(expected.locked_by))
            .values(locked_by=after.locked_by, locked_reason=after.locked_reason, locked_at=after.locked_at)
        )
        with self.engine.begin() as conn:
            if conn.execute(query).rowcount != 1:
                raise Conflict(expected.uuid, {"locked_by": expected.locked_by}, actual(conn, expected.uuid))
            audit(conn, expected, after, why, always=True)
        return after

    @retry_on_deadlock
    def reset_state(
        self,
        expected: Instance,
        vm_state: VmState,
        why: Why,
        *,
        claim: Hold | None = None,
        release_claims: bool = False,
        leftover: Migration | None = None,
        **fields: Any,
    ) -> Instance:
        """End the instance's running task failed (its worker fenced) and set ``vm_state``, task idle: one transaction.

        The task's epoch grows, so a worker still inside a hypervisor call
        stops before its next call or write; the task's error says who reset
        it and why (``why.message``). ``fields`` are other columns to set (a
        host cleared); with ``claim`` the instance must hold that claim (taken
        if missing; :class:`NoValidHost` and nothing written when it cannot
        be), with ``release_claims`` it gives back every claim it holds, and
        ``leftover`` is a migration record to insert (an evacuation to
        nowhere: the host's daemon destroys what the task left there).
        """
        at = self.clock.now()
        after = replace(
            expected,
            vm_state=vm_state,
            task_state=None,
            task_id=None,
            version=expected.version + 1,
            updated_at=at,
            **fields,
        )
        with self.engine.begin() as conn:
            cas(conn, expected, after, None)
            _hold(conn, expected.uuid, claim, self.clock.now())
            if release_claims:
                release_all(conn, expected.uuid)
            if leftover is not None:
                conn.execute(sa.insert(MIGRATIONS), migration_values(leftover))
            if expected.task_id is not None:
                error = f"ended by {why.cause.value} {why.actor}: {why.message}"
                close_steps(conn, expected.task_id, at, "failed", error)
                conn.execute(
                    sa.update(_T)
                    .where(_T.c.id == expected.task_id, _T.c.outcome == Outcome.RUNNING.value)
                    .values(
                        outcome=Outcome.FAILED.value,
                        finished_at=at,
                        error=error,
                        lease_expires_at=at,
                        epoch=_T.c.epoch + 1,
                    )
                )
            audit(conn, expected, after, why, always=True)
        return after


def _hold(conn: sa.Connection, uuid: str, claim: Hold | None, at: datetime) -> None:
    """Make sure the instance holds ``claim`` in this transaction; else raise :class:`NoValidHost` (it rolls back)."""
    if claim is None:
        return
    refused = hold(conn, uuid, claim, at)
    if refused is not None:
        raise NoValidHost({claim.host: refused})


def _opened(seq: int, name: str, at: datetime) -> dict[str, Any]:
    return {"seq": seq, "name": name, "started_at": at}


def _expected(instance: Instance) -> dict[str, Any]:
    return {"uuid": instance.uuid, **expect(instance)}


def _worker_write(
    conn: sa.Connection,
    expected: Instance,
    *,
    after: Instance,
    task: Task,
    why: Why,
    task_set: dict[str, Any],
    closed: dict[str, Any],
    opened: dict[str, Any] | None,
) -> None:
    """Write a worker's step or end as one statement; raise as the statement-by-statement write would.

    The instance lost raises as :func:`lifecycle.store._cas.lost` says; the
    task row found at another epoch raises :class:`Fenced` (the transaction
    rolls back).
    """
    parts = _pg.Parts(
        changed(expected, after),
        _expected(expected),
        task_id=task.id,
        task_epoch=task.epoch,
        task_set=task_set,
        close=closed,
        open=opened,
        audit=audit_values(expected, after, why),
    )
    written, at_epoch = _pg.write(conn, parts)
    if written != 1:
        lost(conn, expected, task)
    if at_epoch != 1:
        _fenced(conn, task)


def _still_ours(conn: sa.Connection, task: Task, **values: Any) -> None:
    """Run a worker's task-row update only at the epoch it holds; else raise :class:`Fenced` (the write rolls back).

    The instance's compare-and-swap cannot tell a fenced worker from the
    recovering one (both hold the same task id); the epoch can.
    """
    done = conn.execute(TASK_AT_EPOCH, {**values, "x_id": task.id, "x_epoch": task.epoch}).rowcount
    if done != 1:
        _fenced(conn, task)


def _fenced(conn: sa.Connection, task: Task) -> NoReturn:
    """Raise :class:`Fenced`: the worker's task row is at another epoch than the one it holds."""
    current = conn.execute(sa.select(_T.c.epoch).where(_T.c.id == task.id)).scalar_one()
    raise Fenced(task.id, task.instance_uuid, task.epoch, current)
