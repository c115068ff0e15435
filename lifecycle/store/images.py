"""Images: the base disks instances are built from."""

from __future__ import annotations

import json

import sqlalchemy as sa

from lifecycle.errors import ImageNotFound
from lifecycle.records import Image
from lifecycle.store._base import StoreBase
from lifecycle.store._rows import IMAGES, image_from
from lifecycle.store.db import now

__all__ = ["Images"]

_IM = IMAGES
_BY_NAME = sa.select(_IM).where(_IM.c.name == sa.bindparam("x_name"))


class Images(StoreBase):
    """Image rows."""

    def add_image(
        self, name: str, path: str, disk_format: str, min_disk_gb: int = 0, properties: dict[str, str] | None = None
    ) -> Image:
        """Insert an image; :class:`AlreadyExists` if the name is taken."""
        values = {
            "name": name,
            "path": path,
            "disk_format": disk_format,
            "min_disk_gb": min_disk_gb,
            "created_at": now(),
            "properties": json.dumps(properties or {}, sort_keys=True),
        }
        self._insert_unique(_IM, values, "image", name)
        return self.get_image(name)

    def get_image(self, name: str) -> Image:
        """Return the image named ``name`` or raise :class:`ImageNotFound`."""
        with self._read() as conn:
            row = conn.execute(sa.select(_IM).where(_IM.c.name == name)).mappings().first()
            if row is None:
                raise ImageNotFound(name, conn.execute(sa.select(_IM.c.name)).scalars())
        return image_from(row)

    def find_image(self, name: str) -> Image | None:
        """Return the image named ``name``, or None (one query: no list of names for an error)."""
        with self._read() as conn:
            row = conn.execute(_BY_NAME, {"x_name": name}).mappings().first()
        return None if row is None else image_from(row)

    def list_images(self) -> list[Image]:
        """Return every image, by name."""
        with self._read() as conn:
            rows = conn.execute(sa.select(_IM).order_by(_IM.c.name)).mappings().all()
        return [image_from(r) for r in rows]

    def remove_image(self, name: str) -> bool:
        """Delete the image row named ``name``; return whether there was one (an image the engine made)."""
        with self.engine.begin() as conn:
            return bool(conn.execute(sa.delete(_IM).where(_IM.c.name == name)).rowcount)
