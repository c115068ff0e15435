"""Shelve snapshots: the images the engine makes of a shelved instance's disk, and where it keeps them.

A shelved instance's disk lives on in one image, ``shelved-<uuid>``, a qcow2
file under ``image_store_dir``. Unshelve and delete drop it (row and file).
"""

from __future__ import annotations

import os
from pathlib import Path

from lifecycle.config import Settings
from lifecycle.logs import get_logger
from lifecycle.records import Image
from lifecycle.store import Store

__all__ = ["SNAPSHOT_FORMAT", "drop_snapshot", "image_store", "snapshot_name", "snapshot_of"]

log = get_logger(__name__)

SNAPSHOT_FORMAT = "qcow2"
PREFIX = "shelved-"
"""Image names the engine reserves for its snapshots: ``image add`` refuses them."""
OWNER = "shelved_instance"
"""The image property naming the instance a snapshot belongs to (only such an image is ever deleted)."""


def snapshot_name(uuid: str) -> str:
    """Return the name of the image holding a shelved instance's disk."""
    return f"{PREFIX}{uuid}"


def image_store(settings: Settings) -> Path:
    """Return the directory for images the engine makes (created on first use)."""
    if settings.image_store_dir:
        return Path(settings.image_store_dir).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "lifecycle" / "images"


def snapshot_of(store: Store, uuid: str) -> Image | None:
    """Return the snapshot image of a shelved instance, or None (also for an image not made by a shelve)."""
    image = store.images.find(snapshot_name(uuid))
    return image if image is not None and image.properties.get(OWNER) == uuid else None


def drop_snapshot(store: Store, uuid: str, settings: Settings | None = None) -> None:
    """Delete a shelved instance's snapshot image: its row and its file. Repeat-safe.

    With ``settings``, also the scratch files a killed shelve or unshelve left
    for this instance in the image store (``shelved-<uuid>.qcow2.*``).
    """
    image = snapshot_of(store, uuid)
    if image is not None:
        store.images.remove(image.name)  # the row first: a failure here leaves both, never a row without its file
        Path(image.path).unlink(missing_ok=True)
        log.info("shelve_snapshot_deleted", instance_uuid=uuid, image=image.name)
    if settings is not None:
        for leftover in image_store(settings).glob(f"{snapshot_name(uuid)}.{SNAPSHOT_FORMAT}.*"):
            leftover.unlink(missing_ok=True)
