"""Counts for metrics, read at scrape time: instances per state, running tasks per operation."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from lifecycle.records import Outcome
from lifecycle.states import VmState
from lifecycle.store._base import StoreBase
from lifecycle.store._rows import INSTANCES, TASKS
from lifecycle.store.db import aware

__all__ = ["Stats"]

_I, _T = INSTANCES, TASKS


class Stats(StoreBase):
    """Aggregate reads, one query each."""

    def instance_counts(self) -> dict[tuple[str, str | None], int]:
        """Return the number of live (not deleted) instances per (vm_state, task_state)."""
        query = (
            sa.select(_I.c.vm_state, _I.c.task_state, sa.func.count())
            .where(_I.c.vm_state != VmState.DELETED.value)
            .group_by(_I.c.vm_state, _I.c.task_state)
        )
        with self._read() as conn:
            return {(vm, task): n for vm, task, n in conn.execute(query)}

    def running_task_stats(self) -> dict[str, tuple[int, datetime]]:
        """Return, per operation, how many tasks are running and when the oldest of them started."""
        query = (
            sa.select(_T.c.operation, sa.func.count(), sa.func.min(_T.c.started_at))
            .where(_T.c.outcome == Outcome.RUNNING.value)
            .group_by(_T.c.operation)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        result = {}
        for operation, count, oldest in rows:
            started = aware(oldest)
            assert started is not None
            result[operation] = (count, started)
        return result
