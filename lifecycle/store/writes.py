"""The compare-and-swap writes of a task's life: create, begin, advance, finish, and the idle-instance writes.

Every state write is one transaction holding a conditional UPDATE of the
instance on its expected (version, vm_state, task_state, task_id), the task and
step-log statements that go with it, and one audit row when any of the three
states changed. An UPDATE that matches no row raises: :class:`Preempted` when
the writer's own task was taken over, :class:`Conflict` otherwise. On
PostgreSQL a task's create, begin, advance and finish send that transaction's
statements as one (:mod:`lifecycle.store._pg`); SQLite sends them one by one
(:mod:`lifecycle.store._statements`). Both forms are a :class:`WriteForm`,
chosen once per repository: a write computes its new row and values, then
hands them to its form.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from lifecycle.audit import Why
from lifecycle.errors import AlreadyExists, Conflict
from lifecycle.records import Instance, Migration, Outcome, Task
from lifecycle.states import PowerState, TaskState, VmState
from lifecycle.store._base import Database, StoreBase, retry_on_deadlock
from lifecycle.store._cas import NewStep, StepEnd, actual, audit, cas, close_steps, expect
from lifecycle.store._pg import OneStatement
from lifecycle.store._rows import INSTANCES, MIGRATIONS, TASKS, instance_from, migration_values
from lifecycle.store._statements import Statements, hold_claim
from lifecycle.store.claims import Hold, release_all

__all__ = ["WriteForm", "Writes"]

_I, _T = INSTANCES, TASKS
_LOCK_INSTANCE = sa.select(_I).where(_I.c.uuid == sa.bindparam("x_uuid")).with_for_update()
"""The instance's row, locked until the transaction ends (PostgreSQL; SQLite's writes are serialized anyway)."""


class WriteForm(Protocol):
    """How a task's create, begin, advance and finish reach the database, inside the caller's transaction.

    Each method writes the instance's new row (``after`` over ``expected``, or
    ``instance`` inserted), the task's row, its step log and the audit row, the
    instance row first (the lock order of every write). A compare-and-swap
    that matches no row raises as :func:`lifecycle.store._cas.lost` says
    (:class:`Preempted`, :class:`Conflict`; :class:`Fenced` for a worker's task
    at another epoch) and the transaction rolls back.
    """

    def create(self, conn: sa.Connection, instance: Instance, task: Task, *, opened: NewStep, why: Why) -> None:
        """Insert ``instance`` owned by ``task``, the task's row, step ``opened`` and the audit row."""

    def begin(
        self,
        conn: sa.Connection,
        expected: Instance,
        after: Instance,
        task: Task,
        *,
        opened: NewStep,
        why: Why,
        preempt: Task | None,
        claim: Hold | None,
    ) -> None:
        """Start ``task``: the instance swapped, ``claim`` held, ``preempt`` preempted, task row, step and audit row."""

    def advance(
        self,
        conn: sa.Connection,
        expected: Instance,
        after: Instance,
        task: Task,
        *,
        why: Why,
        closed: StepEnd,
        opened: NewStep,
        task_set: dict[str, Any],
    ) -> None:
        """Move ``task`` on: the instance swapped, open step ``closed``, step ``opened``, ``task_set`` at its epoch."""

    def finish(
        self,
        conn: sa.Connection,
        expected: Instance,
        after: Instance,
        task: Task,
        *,
        why: Why,
        closed: StepEnd,
        task_set: dict[str, Any],
    ) -> None:
        """End ``task``: the instance swapped, open step ``closed``, ``task_set`` (its ending) at its epoch."""


class Writes(StoreBase):
    """Instance state changes, each with its task, step and audit rows in the same transaction."""

    def __init__(self, db: Database, form: WriteForm | None = None) -> None:
        super().__init__(db)
        self._form: WriteForm = form if form is not None else OneStatement() if db.one_statement else Statements()
        """How a task's writes reach the database: one statement each on PostgreSQL, several on SQLite."""

    @retry_on_deadlock
    def create(self, instance: Instance, task: Task, step: str, why: Why) -> Instance:
        """Insert a new instance already owned by ``task``, with its first step and audit row."""
        try:
            with self.engine.begin() as conn:
                self._form.create(conn, instance, task, opened=_opened(1, step, self.clock.now()), why=why)
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
                opened = _opened(1, task_state.value, self.clock.now())
                self._form.begin(conn, expected, after, task, opened=opened, why=why, preempt=preempt, claim=claim)
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
        closed = StepEnd(at, "retried" if retried else "ok", why.message)
        task_set = {"lease_expires_at": at + self.lease}
        with self.engine.begin() as conn:
            opened = _opened(seq, task_state.value, at)
            self._form.advance(conn, expected, after, task, why=why, closed=closed, opened=opened, task_set=task_set)
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
        closed = StepEnd(at, "ok" if outcome is Outcome.SUCCEEDED else "failed", error)
        ended = {"outcome": outcome.value, "finished_at": at, "error": error, "traceback": traceback}
        with self.engine.begin() as conn:
            self._form.finish(
                conn, expected, after, task, why=why, closed=closed, task_set={**ended, "lease_expires_at": at}
            )
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
            hold_claim(conn, expected.uuid, claim, self.clock.now())
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


def _opened(seq: int, name: str, at: datetime) -> NewStep:
    return NewStep(seq, name, at)
