"""A task's state writes statement by statement: SQLite's form, and PostgreSQL's for a start that preempts or claims.

Each write runs in the caller's transaction: the instance's compare-and-swap
first, then the task's row, its step log and the audit row (:mod:`lifecycle.store._cas`),
one statement each. On SQLite, in the engine's own process, a statement costs
no round trip; on PostgreSQL the same writes go as one statement each
(:class:`lifecycle.store._pg.OneStatement`), except a start that preempts a
task or takes a claim, which comes here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from lifecycle.audit import Why
from lifecycle.errors import NoValidHost
from lifecycle.records import Instance, Task
from lifecycle.store._cas import NewStep, StepEnd, audit, cas, close_steps, open_step, still_ours
from lifecycle.store._cas import preempt as mark_preempted
from lifecycle.store._rows import INSTANCES, TASKS, instance_values, task_values
from lifecycle.store.claims import Hold, hold

__all__ = ["Statements", "hold_claim"]

_INSERT_INSTANCE = sa.insert(INSTANCES)
_INSERT_TASK = sa.insert(TASKS)


class Statements:
    """The statement-by-statement form of a task's writes (:class:`lifecycle.store.writes.WriteForm`)."""

    def create(self, conn: sa.Connection, instance: Instance, task: Task, *, opened: NewStep, why: Why) -> None:
        """Insert the instance, its task, the first step and the audit row."""
        conn.execute(_INSERT_INSTANCE, instance_values(instance))
        conn.execute(_INSERT_TASK, task_values(task))
        open_step(conn, task.id, *opened)
        audit(conn, None, instance, why)

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
        """Swap the instance to ``after``, hold ``claim``, preempt ``preempt``, insert the task and its first step."""
        # Lock order: the instance row first, then task rows, in every write
        # (a worker's finish does the same), so PostgreSQL never deadlocks on them.
        cas(conn, expected, after, None)
        hold_claim(conn, expected.uuid, claim, opened.started_at)
        if preempt is not None:
            mark_preempted(conn, preempt, task)
        conn.execute(_INSERT_TASK, task_values(task))
        open_step(conn, task.id, *opened)
        # Always audited: a takeover (hard reboot over hard reboot) may change no state, only the task.
        audit(conn, expected, after, why, always=True)

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
        """Swap the instance to ``after``, close the open step, open the next, set ``task_set`` at the task's epoch."""
        cas(conn, expected, after, task)
        close_steps(conn, task.id, *closed)
        open_step(conn, task.id, *opened)
        still_ours(conn, task, task_set)
        audit(conn, expected, after, why)

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
        """Swap the instance to ``after``, close the open step, set ``task_set`` (the ending) at the task's epoch."""
        cas(conn, expected, after, task)
        close_steps(conn, task.id, *closed)
        still_ours(conn, task, task_set)
        audit(conn, expected, after, why)


def hold_claim(conn: sa.Connection, uuid: str, claim: Hold | None, at: datetime) -> None:
    """Make sure the instance holds ``claim`` in this transaction; else raise :class:`NoValidHost` (it rolls back)."""
    if claim is None:
        return
    refused = hold(conn, uuid, claim, at)
    if refused is not None:
        raise NoValidHost({claim.host: refused})
