"""A task's state writes as one statement on PostgreSQL: the compare-and-swap and its rows in one round trip.

A state write is a compare-and-swap of the instance row plus the rows that go
with it: the task's row (inserted at its start; at each step and at its end
updated only at the epoch the worker holds), the step log's closed and opened
steps, and the audit row. On SQLite, in the engine's own process, these are
separate statements at no cost; on a server, each is a round trip and a pass
through the driver, and ``bench/storm.py`` measured them at half of what an
operation spends. Here they are one statement of data-modifying CTEs:

    WITH c AS (UPDATE instances SET ... WHERE <expected> RETURNING 1),
         t AS (UPDATE tasks SET ... WHERE id = ... AND epoch = ... AND EXISTS (SELECT 1 FROM c) RETURNING 1),
         s AS (UPDATE task_steps SET ... WHERE task_id = ... AND finished_at IS NULL AND EXISTS (SELECT 1 FROM c)),
         o AS (INSERT INTO task_steps (...) SELECT ... FROM c),
         a AS (INSERT INTO audit_log (...) SELECT ... FROM c)
    SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM t)

Every other part is conditional on the compare-and-swap's row, so a lost
compare-and-swap writes nothing; the caller then raises exactly as the
statement-by-statement form does (Conflict, Preempted, Fenced), and a task
row found at another epoch raises Fenced and rolls the transaction back.
:class:`OneStatement` is this form of :class:`lifecycle.store.writes.WriteForm`;
a start that preempts a task or takes a claim goes statement by statement
(:class:`lifecycle.store._statements.Statements`).
Reading ``c`` first also keeps the lock order of every write: the instance
row, then the task's. The SQL text is built once per shape (which columns
change, which parts are present) and sent as is, with a cast on every
parameter so the server types it from the column it fills.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from lifecycle.audit import Why
from lifecycle.records import Instance, Task
from lifecycle.store._cas import NewStep, StepEnd, audit_values, changed, expect, fenced, lost
from lifecycle.store._rows import AUDITS, INSTANCES, STEPS, TASKS, instance_values, task_values
from lifecycle.store._statements import Statements
from lifecycle.store.claims import Hold

__all__ = ["OneStatement", "Parts", "write"]

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]
_Q = _DIALECT.identifier_preparer.quote


class Parts(NamedTuple):
    """What one state write holds besides the instance's compare-and-swap (or its insert)."""

    instance: dict[str, Any]
    """The instance's new column values: all of them for an insert, the changed ones for a compare-and-swap."""
    expected: dict[str, Any] | None = None
    """The compare-and-swap's expected columns (uuid, version, vm_state, task_state, task_id); None: insert."""
    task_id: str | None = None
    """The task whose step log is written (and whose row is updated at ``task_epoch`` when ``task_set``)."""
    task_epoch: int | None = None
    task_set: dict[str, Any] | None = None
    """Columns of the task row to set, only while it is at ``task_epoch``."""
    new_task: dict[str, Any] | None = None
    """A task row to insert (a task's start)."""
    close: dict[str, Any] | None = None
    """finished_at, result and detail for the task's open steps."""
    open: dict[str, Any] | None = None
    """seq, name and started_at of the step to open."""
    audit: dict[str, Any] | None = None
    """The audit row, if the write changes a state (or always writes one)."""


class OneStatement:
    """A task's writes, one statement each (a :class:`~lifecycle.store.writes.WriteForm`), raising as the other."""

    def __init__(self) -> None:
        self._statements = Statements()
        """The form of a start that preempts a task or takes a claim."""

    def create(self, conn: sa.Connection, instance: Instance, task: Task, *, opened: NewStep, why: Why) -> None:
        """Insert the instance, its task, the first step and the audit row."""
        parts = Parts(
            instance_values(instance),
            task_id=task.id,
            new_task=task_values(task),
            open=opened._asdict(),
            audit=audit_values(None, instance, why),
        )
        write(conn, parts)

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
        """Swap the instance to ``after``, insert the task and its first step (by statements to preempt or claim)."""
        if preempt is not None or claim is not None:
            self._statements.begin(conn, expected, after, task, opened=opened, why=why, preempt=preempt, claim=claim)
            return
        parts = Parts(
            changed(expected, after),
            _expected(expected),
            task_id=task.id,
            new_task=task_values(task),
            open=opened._asdict(),
            audit=audit_values(expected, after, why, always=True),
        )
        if write(conn, parts)[0] != 1:
            lost(conn, expected, None)

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
        _worker_write(conn, expected, after=after, task=task, why=why, task_set=task_set, closed=closed, opened=opened)

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
        _worker_write(conn, expected, after=after, task=task, why=why, task_set=task_set, closed=closed, opened=None)


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
    closed: StepEnd,
    opened: NewStep | None,
) -> None:
    """Write a worker's step or end as one statement; raise as the statement-by-statement write would.

    The instance lost raises as :func:`lifecycle.store._cas.lost` says; the
    task row found at another epoch raises :class:`Fenced` (the transaction
    rolls back).
    """
    parts = Parts(
        changed(expected, after),
        _expected(expected),
        task_id=task.id,
        task_epoch=task.epoch,
        task_set=task_set,
        close=closed._asdict(),
        open=None if opened is None else opened._asdict(),
        audit=audit_values(expected, after, why),
    )
    written, at_epoch = write(conn, parts)
    if written != 1:
        lost(conn, expected, task)
    if at_epoch != 1:
        fenced(conn, task)


def write(conn: sa.Connection, parts: Parts) -> tuple[int, int]:
    """Send the write as one statement; return (instance rows written, task rows updated at the epoch)."""
    if parts.expected is None or parts.new_task is not None or parts.audit is not None:
        # Inserted columns left NULL need no parameter (psycopg caches the conversion of a query with at
        # most 50): a create's statement drops from about 60 to under 50.
        parts = parts._replace(
            instance=parts.instance if parts.expected is not None else _set(INSTANCES, parts.instance),
            new_task=None if parts.new_task is None else _set(TASKS, parts.new_task),
            audit=None if parts.audit is None else _set(AUDITS, parts.audit),
        )
    sql = _sql(
        tuple(parts.instance),
        parts.expected is not None,
        None if parts.task_set is None else tuple(parts.task_set),
        None if parts.new_task is None else tuple(parts.new_task),
        parts.close is not None,
        parts.open is not None,
        None if parts.audit is None else tuple(parts.audit),
    )
    params: dict[str, Any] = {f"i_{k}": v for k, v in parts.instance.items()}
    if parts.expected is not None:
        params.update({f"x_{k}": v for k, v in parts.expected.items()})
    if parts.task_id is not None:
        params["t_id"] = parts.task_id
        params["t_epoch"] = parts.task_epoch
    for prefix, values in (("t_", parts.task_set), ("n_", parts.new_task), ("s_", parts.close), ("o_", parts.open)):
        if values is not None:
            params.update({f"{prefix}{k}": v for k, v in values.items()})
    if parts.audit is not None:
        params.update({f"a_{k}": v for k, v in parts.audit.items()})
    written, task = conn.exec_driver_sql(sql, params).one()
    return int(written), int(task)


def _set(table: sa.Table, values: dict[str, Any]) -> dict[str, Any]:
    """Return the values of an inserted row that are not NULL (or whose column has a server default to override)."""
    return {k: v for k, v in values.items() if v is not None or table.c[k].server_default is not None}


def _param(table: sa.Table, column: str, prefix: str) -> str:
    kind = table.c[column].type
    if isinstance(kind, sa.String) and kind.length:
        # A cast to VARCHAR(n) would cut a longer value silently; the column itself refuses it with an error.
        kind = sa.String()
    return f"%({prefix}{column})s::{kind.compile(dialect=_DIALECT)}"


def _insert(name: str, table: sa.Table, columns: tuple[str, ...], prefix: str, source: str) -> str:
    values = ", ".join(_param(table, c, prefix) for c in columns)
    return f"{name} AS (INSERT INTO {_Q(table.name)} ({', '.join(_Q(c) for c in columns)}) SELECT {values} {source})"


@functools.cache
def _sql(
    instance: tuple[str, ...],
    swap: bool,
    task_set: tuple[str, ...] | None,
    new_task: tuple[str, ...] | None,
    close: bool,
    open_step: bool,
    audit: tuple[str, ...] | None,
) -> str:
    i = INSTANCES
    if swap:
        sets = ", ".join(f"{_Q(c)} = {_param(i, c, 'i_')}" for c in instance)
        where = (
            f"uuid = {_param(i, 'uuid', 'x_')} AND version = {_param(i, 'version', 'x_')}"
            f" AND vm_state = {_param(i, 'vm_state', 'x_')}"
            f" AND task_state IS NOT DISTINCT FROM {_param(i, 'task_state', 'x_')}"
            f" AND task_id IS NOT DISTINCT FROM {_param(i, 'task_id', 'x_')}"
        )
        parts = [f"c AS (UPDATE instances SET {sets} WHERE {where} RETURNING 1)"]
    else:
        columns = ", ".join(_Q(c) for c in instance)
        values = ", ".join(_param(i, c, "i_") for c in instance)
        parts = [f"c AS (INSERT INTO instances ({columns}) VALUES ({values}) RETURNING 1)"]
    after_swap = "FROM c"
    if task_set is not None:
        sets = ", ".join(f"{_Q(c)} = {_param(TASKS, c, 't_')}" for c in task_set)
        parts.append(
            f"t AS (UPDATE tasks SET {sets} WHERE id = %(t_id)s::VARCHAR AND epoch = %(t_epoch)s::INTEGER"
            " AND EXISTS (SELECT 1 FROM c) RETURNING 1)"
        )
    if new_task is not None:
        parts.append(_insert("n", TASKS, new_task, "n_", after_swap))
    if close:
        sets = ", ".join(f"{_Q(c)} = {_param(STEPS, c, 's_')}" for c in ("finished_at", "result", "detail"))
        parts.append(
            f"s AS (UPDATE task_steps SET {sets} WHERE task_id = %(t_id)s::VARCHAR AND finished_at IS NULL"
            " AND EXISTS (SELECT 1 FROM c))"
        )
    if open_step:
        parts.append(
            f"o AS (INSERT INTO task_steps (task_id, seq, name, started_at) SELECT %(t_id)s::VARCHAR, "
            f"{_param(STEPS, 'seq', 'o_')}, {_param(STEPS, 'name', 'o_')}, {_param(STEPS, 'started_at', 'o_')} FROM c)"
        )
    if audit is not None:
        parts.append(_insert("a", AUDITS, audit, "a_", after_swap))
    counted = "(SELECT count(*) FROM t)" if task_set is not None else "0"
    return f"WITH {', '.join(parts)} SELECT (SELECT count(*) FROM c), {counted}"
