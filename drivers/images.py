"""Image cache, per-instance qcow2 overlays and image inspection, with qemu-img.

Layout under a host's instances path::

    _base/<sha1 of the image path>   cached copy of an image, shared by instances
    <uuid>/disk                       qcow2 overlay, absolute backing path to _base
    <uuid>_resize/                    the source directory of a move until confirm

``qemu-img`` is always called with an argument list (never a shell) and an
explicit format. Every image is inspected before use: one whose real format
is not the declared one, or whose backing file or data file points outside
the cache, is refused; this is the class of flaw behind OpenStack's 2024
image-format advisories (a "raw" image that is really a qcow2 pointing at a
host file). Paths are built only from validated uuids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.errors import DomainNotFound, DriverError

__all__ = ["ImageCache", "ImageInfo", "UnsafeImage", "inspect_image", "qemu_img", "valid_uuid"]

FORMATS = ("qcow2", "raw")
QEMU_IMG = os.environ.get("LIFECYCLE_QEMU_IMG", "qemu-img")


class UnsafeImage(DriverError):
    """An image was refused by inspection (wrong format, or a backing/data file outside the cache)."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ``qemu-img info`` says about a file."""

    path: str
    format: str
    virtual_size: int
    backing_file: str | None
    data_file: str | None


def valid_uuid(value: str) -> str:
    """Return ``value`` in canonical form, or raise: the only way a uuid enters a path."""
    try:
        canonical = str(uuidlib.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise DriverError(f"invalid instance uuid {value!r}") from None
    if canonical != value:
        raise DriverError(f"instance uuid {value!r} is not in canonical form")
    return canonical


def qemu_img(*args: str) -> str:
    """Run qemu-img with an argument list; raise DriverError with its stderr on failure."""
    try:
        done = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, check=False, timeout=300)
    except FileNotFoundError:
        raise DriverError(f"{QEMU_IMG} not found: install qemu-utils") from None
    if done.returncode != 0:
        raise DriverError(f"qemu-img {args[0]} failed: {done.stderr.strip()}", call=f"qemu-img {args[0]}")
    return done.stdout


def _info(path: Path, fmt: str | None, *, force_share: bool = False) -> dict[str, Any]:
    args = ["info", "--output=json"]
    if fmt is not None:
        args += ["-f", fmt]
    if force_share:
        args.append("-U")
    data: dict[str, Any] = json.loads(qemu_img(*args, str(path)))
    return data


def inspect_image(path: Path, declared: str, allowed_dir: Path | None = None) -> ImageInfo:
    """Inspect ``path`` declared as ``declared`` and refuse anything unsafe.

    Refused: an unknown declared format; a real format (probed from the
    contents) other than the declared one; a backing file or a data file
    anywhere but inside ``allowed_dir`` (nowhere, when it is None).
    """
    if declared not in FORMATS:
        raise UnsafeImage(f"image {path}: declared format {declared!r} is not one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DriverError(f"image {path} does not exist or is not a file")
    probed = _info(path, None).get("format")
    if probed != declared:
        raise UnsafeImage(f"image {path} is declared {declared} but its contents are {probed}")
    data = _info(path, declared)
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    data_file = (data.get("format-specific", {}).get("data", {}) or {}).get("data-file")
    for kind, ref in (("backing file", backing), ("data file", data_file)):
        if ref is not None and not _inside(path.parent / ref, allowed_dir):
            raise UnsafeImage(f"image {path} has a {kind} {ref!r} outside the image cache")
    return ImageInfo(str(path), declared, int(data["virtual-size"]), backing, data_file)


def _inside(candidate: Path, directory: Path | None) -> bool:
    if directory is None:
        return False
    return Path(os.path.realpath(candidate)).is_relative_to(os.path.realpath(directory))


class ImageCache:
    """The ``_base`` cache and the instance directories of one host."""

    def __init__(self, instances_path: str | Path) -> None:
        self.root = Path(instances_path)
        self.base_dir = self.root / "_base"

    def instance_dir(self, uuid: str) -> Path:
        """Return ``<instances_path>/<uuid>`` for a validated uuid."""
        return self.root / valid_uuid(uuid)

    def disk_path(self, uuid: str) -> Path:
        """Return the path of an instance's root disk overlay."""
        return self.instance_dir(uuid) / "disk"

    def cache(self, source: str, declared: str) -> Path:
        """Copy an inspected image into ``_base`` (once) and return the cached path."""
        src = Path(source)
        inspect_image(src, declared)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        cached = self.base_dir / hashlib.sha1(str(src.resolve()).encode()).hexdigest()
        if not cached.exists():
            partial = cached.with_name(f"{cached.name}.part-{os.getpid()}-{uuidlib.uuid4().hex[:8]}")
            shutil.copyfile(src, partial)
            inspect_image(partial, declared)
            partial.replace(cached)
        os.utime(cached)
        return cached

    def create_overlay(self, uuid: str, base: Path, base_format: str, size_gb: int, name: str = "disk") -> Path:
        """Create ``<uuid>/<name>`` as a qcow2 overlay on ``base``, at least ``size_gb`` GiB."""
        directory = self.instance_dir(uuid)
        directory.mkdir(parents=True, exist_ok=True)
        disk = directory / name
        base_abs = str(base.resolve())
        base_size = int(_info(base, base_format)["virtual-size"])
        size = max(base_size, size_gb * 1024**3)
        qemu_img("create", "-q", "-f", "qcow2", "-F", base_format, "-b", base_abs, str(disk), str(size))
        inspect_image(disk, "qcow2", self.base_dir)
        return disk

    def grow(self, disk: Path, size_gb: int) -> None:
        """Grow a (not running) qcow2 disk to ``size_gb`` GiB; never shrinks."""
        current = int(_info(disk, "qcow2")["virtual-size"])
        if size_gb * 1024**3 > current:
            qemu_img("resize", "-q", "-f", "qcow2", str(disk), f"{size_gb}G")

    def backing_chain(self, disk: Path) -> list[str]:
        """Return the files of a disk's backing chain, the disk first (readable while in use)."""
        args = ["info", "--output=json", "--backing-chain", "-U", "-f", "qcow2", str(disk)]
        return [entry["filename"] for entry in json.loads(qemu_img(*args))]

    def resize_dir(self, uuid: str) -> Path:
        """Return ``<instances_path>/<uuid>_resize``, where a move's source keeps the disk."""
        return self.root / f"{valid_uuid(uuid)}_resize"

    def set_aside(self, uuid: str) -> Path:
        """Rename ``<uuid>`` to ``<uuid>_resize`` (once) and return the kept disk's path."""
        aside = self.resize_dir(uuid)
        if not aside.exists():
            self.instance_dir(uuid).rename(aside)
        return aside / "disk"

    def put_back(self, uuid: str) -> None:
        """Rename ``<uuid>_resize`` back to ``<uuid>`` (a revert); nothing kept is an error."""
        aside, home = self.resize_dir(uuid), self.instance_dir(uuid)
        if aside.exists():
            shutil.rmtree(home, ignore_errors=True)
            aside.rename(home)
        elif not home.exists():
            raise DomainNotFound(uuid, call="finish_revert_migration")

    def receive(self, uuid: str, source_disk: Path, base: Path, base_format: str, size_gb: int) -> Path:
        """Copy a moved overlay in, rebase it on this cache's copy of its base, and grow it (once)."""
        disk = self.disk_path(uuid)
        if disk.exists():
            return disk
        disk.parent.mkdir(parents=True, exist_ok=True)
        partial = disk.with_name("disk.part")
        shutil.copyfile(source_disk, partial)
        # Unsafe rebase: the new base is a byte copy of the old one, so no data moves.
        qemu_img("rebase", "-u", "-f", "qcow2", "-F", base_format, "-b", str(base.resolve()), str(partial))
        inspect_image(partial, "qcow2", self.base_dir)
        partial.replace(disk)
        self.grow(disk, size_gb)
        return disk

    def remove_instance(self, uuid: str) -> None:
        """Delete an instance's directory; a missing one is success."""
        shutil.rmtree(self.instance_dir(uuid), ignore_errors=True)

    def cleanup(
        self,
        in_use: Iterable[Path],
        max_age_seconds: float,
        now: float | None = None,
        moving: Iterable[str] | None = None,
    ) -> list[Path]:
        """Remove unused cached bases (and stale ``<uuid>_resize`` dirs) older than the age; return them.

        A base counts as used when any ``in_use`` disk's backing chain reaches
        it or when some instance directory's disk is backed by it, so a base is
        never removed from under a disk. With ``moving`` (the uuids whose move
        is not yet confirmed or reverted), a ``<uuid>_resize`` directory of any
        other instance is removed too once old enough; without it, none is.
        """
        moment = time.time() if now is None else now
        removed = self._stale_resize_dirs(set(moving), max_age_seconds, moment) if moving is not None else []
        if not self.base_dir.is_dir():
            return removed
        used = {os.path.realpath(p) for p in in_use}
        for disk in self.root.glob("*/disk"):
            if disk.parent != self.base_dir:
                used.update(os.path.realpath(f) for f in self.backing_chain(disk)[1:])
        for base in sorted(self.base_dir.iterdir()):
            if ".part-" in base.name or os.path.realpath(base) in used:
                continue
            if moment - base.stat().st_mtime >= max_age_seconds:
                base.unlink(missing_ok=True)
                removed.append(base)
        return removed

    def _stale_resize_dirs(self, moving: set[str], max_age_seconds: float, moment: float) -> list[Path]:
        removed = []
        for directory in sorted(self.root.glob("*_resize")):
            uuid = directory.name.removesuffix("_resize")
            try:
                valid_uuid(uuid)
            except DriverError:
                continue  # not ours: never touch what we did not name
            if uuid not in moving and moment - directory.stat().st_mtime >= max_age_seconds:
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
        return removed
