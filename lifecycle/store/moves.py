"""Migrations: the records of cold migrations and resizes, from start to confirm or revert."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from lifecycle.records import Migration
from lifecycle.store._base import StoreBase
from lifecycle.store._rows import MIGRATIONS, migration_from, migration_values
from lifecycle.store.db import now

__all__ = ["Moves"]

_M = MIGRATIONS


class Moves(StoreBase):
    """Migration rows."""

    def add_migration(self, migration: Migration) -> None:
        """Insert a migration record."""
        with self.engine.begin() as conn:
            conn.execute(sa.insert(_M), migration_values(migration))

    def update_migration(self, migration_id: str, **values: Any) -> Migration:
        """Change a migration's status (and dest host, source disk, finished_at...)."""
        values["updated_at"] = now()
        with self.engine.begin() as conn:
            conn.execute(sa.update(_M).where(_M.c.id == migration_id).values(**values))
        return self.get_migration(migration_id)

    def get_migration(self, migration_id: str) -> Migration:
        """Return a migration by id."""
        with self._read() as conn:
            return migration_from(conn.execute(sa.select(_M).where(_M.c.id == migration_id)).mappings().one())

    def open_migration(self, uuid: str) -> Migration | None:
        """Return the instance's newest migration not yet confirmed, reverted or failed."""
        query = (
            sa.select(_M)
            .where(_M.c.instance_uuid == uuid, _M.c.status.not_in(("confirmed", "reverted", "error")))
            .order_by(_M.c.created_at.desc())
        )
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else migration_from(row)

    def migrations_finished_before(self, moment: datetime) -> list[Migration]:
        """Return finished migrations whose finish is older than ``moment`` (the confirm window)."""
        query = sa.select(_M).where(_M.c.status == "finished", _M.c.finished_at < moment).order_by(_M.c.finished_at)
        with self._read() as conn:
            return [migration_from(r) for r in conn.execute(query).mappings()]

    def _open_migrations_touching(self, host: str) -> list[Migration]:
        query = sa.select(_M).where(
            sa.or_(_M.c.source_host == host, _M.c.dest_host == host),
            _M.c.status.not_in(("confirmed", "reverted", "error", "failed")),
        )
        with self._read() as conn:
            return [migration_from(r) for r in conn.execute(query).mappings()]
