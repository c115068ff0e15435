"""Images: the base disks instances are built from, and what a host's image cache cleanup must keep."""

from __future__ import annotations

import builtins
import json
from collections.abc import Collection

import sqlalchemy as sa

from lifecycle.errors import ImageNotFound
from lifecycle.records import Image
from lifecycle.states import MigrationStatus, TaskState, VmState
from lifecycle.store._base import StoreBase
from lifecycle.store._rows import IMAGES, INSTANCES, MIGRATIONS, image_from
from lifecycle.store.moves import EVACUATION

__all__ = ["Images"]

_IM, _I, _M = IMAGES, INSTANCES, MIGRATIONS
_BY_NAME = sa.select(_IM).where(_IM.c.name == sa.bindparam("x_name"))
_OPEN_MOVE = (
    sa.select(_M.c.id)
    .where(
        _M.c.instance_uuid == _I.c.uuid,
        _M.c.status.not_in([s.value for s in MigrationStatus if not s.open]),
        _M.c.kind != EVACUATION,
    )
    .exists()
)


class Images(StoreBase):
    """Image rows."""

    def add(
        self, name: str, path: str, disk_format: str, min_disk_gb: int = 0, properties: dict[str, str] | None = None
    ) -> Image:
        """Insert an image; :class:`AlreadyExists` if the name is taken."""
        values = {
            "name": name,
            "path": path,
            "disk_format": disk_format,
            "min_disk_gb": min_disk_gb,
            "created_at": self.clock.now(),
            "properties": json.dumps(properties or {}, sort_keys=True),
        }
        self._insert_unique(_IM, values, "image", name)
        return self.get(name)

    def get(self, name: str) -> Image:
        """Return the image named ``name`` or raise :class:`ImageNotFound`."""
        with self._read() as conn:
            row = conn.execute(sa.select(_IM).where(_IM.c.name == name)).mappings().first()
            if row is None:
                raise ImageNotFound(name, conn.execute(sa.select(_IM.c.name)).scalars())
        return image_from(row)

    def find(self, name: str) -> Image | None:
        """Return the image named ``name``, or None (one query: no list of names for an error)."""
        with self._read() as conn:
            row = conn.execute(_BY_NAME, {"x_name": name}).mappings().first()
        return None if row is None else image_from(row)

    def list(self) -> builtins.list[Image]:
        """Return every image, by name."""
        with self._read() as conn:
            rows = conn.execute(sa.select(_IM).order_by(_IM.c.name)).mappings().all()
        return [image_from(r) for r in rows]

    def moving_instances(self, move_task_states: Collection[TaskState]) -> frozenset[str]:
        """Return the live instances a move may still need a disk of anywhere, in one query.

        Those resized, those with a task in one of ``move_task_states`` (a
        move under way) and those with an open move (a failed one included):
        an image cache cleanup keeps their disks on every host.
        """
        query = sa.select(_I.c.uuid).where(
            _I.c.vm_state != VmState.DELETED.value,
            sa.or_(
                _I.c.vm_state == VmState.RESIZED.value,
                _I.c.task_state.in_(sorted(t.value for t in move_task_states)),
                _OPEN_MOVE,
            ),
        )
        with self._read() as conn:
            return frozenset(conn.execute(query).scalars())

    def remove(self, name: str) -> bool:
        """Delete the image row named ``name``; return whether there was one (an image the engine made)."""
        with self.engine.begin() as conn:
            return bool(conn.execute(sa.delete(_IM).where(_IM.c.name == name)).rowcount)
