"""Image inspection with qemu-img, on the engine's side, before an image goes to any host.

``qemu-img`` runs only on files the engine itself holds (the image files it
was given); what lives on a host is reached through libvirt alone
(:mod:`lifecycle.drivers.storage`). ``qemu-img`` is always called with an argument
list (never a shell) and an explicit format. Every image is inspected before
use: one whose real format is not the declared one, or that has a backing
file or a data file at all, is refused; this is the class of flaw behind
OpenStack's 2024 image-format advisories (a "raw" image that is really a
qcow2 pointing at a host file). Names on a host are built only from
validated uuids.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.errors import DriverError

__all__ = ["ImageInfo", "UnsafeImage", "inspect_image", "qemu_img", "valid_uuid"]

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
