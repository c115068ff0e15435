"""Migrations: the records of cold migrations and resizes, from start to confirm or revert, and of evacuations.

An evacuation's record is no move: nothing is confirmed or reverted, so the
queries for open moves leave it out.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from lifecycle.errors import Conflict, MigrationNotFound
from lifecycle.records import Migration
from lifecycle.states import MIGRATION_TRANSITIONS, MigrationStatus, TaskState
from lifecycle.store._base import StoreBase
from lifecycle.store._rows import MIGRATIONS, STEPS, migration_from, migration_values

__all__ = ["Moves"]

_M, _S = MIGRATIONS, STEPS
_COPY_STEP = TaskState.RESIZE_FINISH.value  # the step of a move that copies the disk and records its progress
_CLOSED = [s.value for s in MigrationStatus if not s.open]
EVACUATION = "evacuation"
"""The ``kind`` of an evacuation's migration record."""
_A_MOVE = _M.c.kind != EVACUATION


class Moves(StoreBase):
    """Migration rows."""

    def add(self, migration: Migration) -> None:
        """Insert a migration record."""
        with self.engine.begin() as conn:
            conn.execute(sa.insert(_M), migration_values(migration))

    def update(self, migration_id: str, **values: Any) -> Migration:
        """Change a migration's status (and dest host, source disk, finished_at...).

        A new status is written only from a status that may lead to it
        (:data:`lifecycle.states.MIGRATION_TRANSITIONS`); any other raises
        :class:`Conflict` and writes nothing.
        """
        values["updated_at"] = self.clock.now()
        query = sa.update(_M).where(_M.c.id == migration_id)
        status = values.get("status")
        if status is not None:
            new = MigrationStatus(status)
            sources = [new.value, *(s.value for s, exits in MIGRATION_TRANSITIONS.items() if new in exits)]
            query = query.where(_M.c.status.in_(sources))
            values["status"] = new.value
        with self.engine.begin() as conn:
            if conn.execute(query.values(**values)).rowcount != 1:
                actual = self.get(migration_id)
                raise Conflict(
                    actual.instance_uuid,
                    {"migration status": f"one leading to {status}"},
                    {"migration status": actual.status.value},
                )
        return self.get(migration_id)

    def get(self, migration_id: str) -> Migration:
        """Return a migration by id; :class:`MigrationNotFound` otherwise."""
        with self._read() as conn:
            row = conn.execute(_with_progress().where(_M.c.id == migration_id)).mappings().first()
        if row is None:
            raise MigrationNotFound(migration_id)
        return migration_from(row)

    def list(self, host: str | None = None) -> builtins.list[Migration]:
        """Return migrations, newest first, optionally those whose source or destination is ``host``."""
        query = _with_progress().order_by(_M.c.created_at.desc(), _M.c.id)
        if host is not None:
            query = query.where(sa.or_(_M.c.source_host == host, _M.c.dest_host == host))
        with self._read() as conn:
            return [migration_from(r) for r in conn.execute(query).mappings()]

    def open_of(self, uuid: str) -> Migration | None:
        """Return the instance's newest migration not yet confirmed, reverted or failed."""
        query = (
            sa.select(_M)
            .where(_M.c.instance_uuid == uuid, _M.c.status.not_in(_CLOSED), _A_MOVE)
            .order_by(_M.c.created_at.desc())
        )
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else migration_from(row)

    def of_task(self, task_id: str) -> Migration | None:
        """Return the migration record a task wrote (an evacuation resumed after a crash finds its own)."""
        with self._read() as conn:
            row = conn.execute(sa.select(_M).where(_M.c.task_id == task_id)).mappings().first()
        return None if row is None else migration_from(row)

    def evacuations_from(self, host: str) -> builtins.list[Migration]:
        """Return the evacuations away from ``host`` whose old copy there is not known to be destroyed yet."""
        query = (
            sa.select(_M)
            .where(_M.c.kind == EVACUATION, _M.c.source_host == host, _M.c.status != MigrationStatus.COMPLETED.value)
            .order_by(_M.c.created_at)
        )
        with self._read() as conn:
            return [migration_from(r) for r in conn.execute(query).mappings()]

    def finished_before(self, moment: datetime) -> builtins.list[Migration]:
        """Return finished migrations whose finish is older than ``moment`` (the confirm window)."""
        query = (
            sa.select(_M)
            .where(_M.c.status == MigrationStatus.FINISHED.value, _M.c.finished_at < moment)
            .order_by(_M.c.finished_at)
        )
        with self._read() as conn:
            return [migration_from(r) for r in conn.execute(query).mappings()]

    def touching(self, host: str) -> builtins.list[Migration]:
        """Return the open migrations whose source or destination is ``host``."""
        query = sa.select(_M).where(
            sa.or_(_M.c.source_host == host, _M.c.dest_host == host),
            _M.c.status.not_in(_CLOSED),
            _A_MOVE,
        )
        with self._read() as conn:
            return [migration_from(r) for r in conn.execute(query).mappings()]


def _with_progress() -> sa.Select[Any]:
    """Select migrations with the progress their task's copy step recorded (when it has begun)."""
    step = sa.and_(_S.c.task_id == _M.c.task_id, _S.c.name == _COPY_STEP)
    return sa.select(_M, _S.c.bytes_done, _S.c.bytes_total).outerjoin(_S, step)
