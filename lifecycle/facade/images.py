"""``engine.images``: register the images instances boot from, and clean hosts' image caches."""

from __future__ import annotations

import builtins

from lifecycle import graph, snapshots, validation
from lifecycle.context import Services
from lifecycle.errors import InvalidInput
from lifecycle.records import Image

__all__ = ["Images"]


class Images:
    """The images of one engine (``engine.images``)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def add(
        self,
        name: str,
        path: str,
        disk_format: str = "qcow2",
        min_disk_gb: int = 0,
        properties: dict[str, str] | None = None,
    ) -> Image:
        """Register an image file instances can boot from (properties: architecture, hypervisor_type).

        ``path`` must be an absolute path to an existing regular file here.
        """
        if disk_format not in ("qcow2", "raw"):
            raise InvalidInput(f"invalid disk format {disk_format!r}: expected qcow2 or raw")
        validation.name("image", name)
        if name.startswith(snapshots.PREFIX):
            raise InvalidInput(
                f"image names starting with {snapshots.PREFIX!r} are kept for shelve snapshots: {name!r}"
            )
        path = validation.image_path(path)
        validation.count("image min_disk_gb", min_disk_gb)
        labels = validation.labels("image properties", properties)
        return self._services.store.images.add(name, path, disk_format, min_disk_gb, labels)

    def list(self) -> builtins.list[Image]:
        """Return every registered image."""
        return self._services.store.images.list()

    def clean_cache(self, host: str, max_age_seconds: float | None = None) -> builtins.list[str]:
        """Remove a host's unused cached base images older than the age, and its orphaned disks; return them.

        The age defaults to the ``image_cache_max_age`` setting. An orphaned
        disk is one of an instance the database places neither on this host
        nor in a move touching it, used by no domain: what a copy or a delete
        left while the host did not answer.
        """
        store = self._services.store
        age = self._services.settings.image_cache_max_age if max_age_seconds is None else max_age_seconds
        age = validation.seconds("image cache max age", age)
        store.hosts.get(validation.name("host", host))
        moving = store.images.moving_instances(graph.MOVE_TASK_STATES)
        keep = frozenset(i.uuid for i in store.instances.list(host)) | frozenset(
            m.instance_uuid for m in store.moves.touching(host)
        )
        return self._services.driver(host).cleanup_images(age, moving, keep)
