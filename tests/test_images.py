"""Image cache, overlays and inspection with the real qemu-img."""

from __future__ import annotations

import os
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from drivers.images import ImageCache, UnsafeImage, inspect_image, valid_uuid
from lifecycle.errors import DriverError

pytestmark = pytest.mark.libvirt


def _img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def cache(tmp_path: Path, base_image: Path) -> ImageCache:
    """An image cache under a scratch instances path."""
    return ImageCache(tmp_path / "instances")


def test_overlay_backing_chain_ends_at_the_cached_base(cache: ImageCache, base_image: Path) -> None:
    """An instance disk is a qcow2 overlay whose backing chain ends at the _base copy, by absolute path."""
    uuid = str(uuidlib.uuid4())
    base = cache.cache(str(base_image), "qcow2")
    disk = cache.create_overlay(uuid, base, "qcow2", 1)
    chain = cache.backing_chain(disk)
    assert chain == [str(cache.root / uuid / "disk"), str(base.resolve())]
    assert base.parent == cache.base_dir


def test_grow_resizes_and_never_shrinks(cache: ImageCache, base_image: Path) -> None:
    """grow() enlarges the virtual size with qemu-img resize; a smaller target is a no-op."""
    disk = cache.create_overlay(str(uuidlib.uuid4()), cache.cache(str(base_image), "qcow2"), "qcow2", 1)
    cache.grow(disk, 3)
    cache.grow(disk, 2)
    assert inspect_image(disk, "qcow2", cache.base_dir).virtual_size == 3 * 1024**3


def test_backing_file_outside_the_cache_is_refused(cache: ImageCache, tmp_path: Path) -> None:
    """A qcow2 whose backing file is a host file (CVE-2024-32498 class) is refused before any copy."""
    secret = tmp_path / "host-secret"
    secret.write_text("root:x:0:0")
    evil = tmp_path / "evil.qcow2"
    _img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(evil), "1M")
    with pytest.raises(UnsafeImage, match=r"backing file .* outside the image cache"):
        cache.cache(str(evil), "qcow2")
    assert not cache.base_dir.exists() or list(cache.base_dir.iterdir()) == []


def test_data_file_outside_the_cache_is_refused(cache: ImageCache, tmp_path: Path) -> None:
    """A qcow2 with an external data file is refused."""
    evil = tmp_path / "datafile.qcow2"
    _img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'external.raw'}", str(evil), "1M")
    with pytest.raises(UnsafeImage, match="data file"):
        cache.cache(str(evil), "qcow2")


@pytest.mark.parametrize(("real", "declared"), [("qcow2", "raw"), ("raw", "qcow2")])
def test_format_mismatch_is_refused(cache: ImageCache, tmp_path: Path, real: str, declared: str) -> None:
    """An image whose contents are not the declared format is refused (a qcow2 posing as raw)."""
    image = tmp_path / f"image.{real}"
    _img("create", "-q", "-f", real, str(image), "1M")
    with pytest.raises(UnsafeImage, match=f"declared {declared} but its contents are {real}"):
        cache.cache(str(image), declared)


def test_unknown_format_and_missing_file_are_refused(cache: ImageCache, base_image: Path, tmp_path: Path) -> None:
    """Only qcow2 and raw are accepted, and the file must exist."""
    with pytest.raises(UnsafeImage):
        cache.cache(str(base_image), "vmdk")
    with pytest.raises(DriverError, match="does not exist"):
        cache.cache(str(tmp_path / "nope.qcow2"), "qcow2")


@pytest.mark.parametrize(
    "bad", ["../../etc", "6a0b7c2e-8f4e-4d1a-9b0a-1234567890ab/../x", "6A0B7C2E-8F4E-4D1A-9B0A-1234567890AB", ""]
)
def test_paths_are_built_only_from_valid_uuids(cache: ImageCache, bad: str) -> None:
    """A uuid that is not canonical (traversal, case, empty) never becomes a path."""
    with pytest.raises(DriverError):
        cache.instance_dir(bad)
    assert valid_uuid("6a0b7c2e-8f4e-4d1a-9b0a-1234567890ab")


def test_cleanup_removes_only_unused_old_bases(cache: ImageCache, base_image: Path, tmp_path: Path) -> None:
    """Unused bases older than the age go; a base behind a disk (even a _resize one) or a young one stays."""
    used_base = cache.cache(str(base_image), "qcow2")
    resize_uuid = str(uuidlib.uuid4())
    disk = cache.create_overlay(resize_uuid, used_base, "qcow2", 1)
    disk.parent.rename(cache.root / f"{resize_uuid}_resize")
    other = tmp_path / "other.qcow2"
    _img("create", "-q", "-f", "qcow2", str(other), "1M")
    old_unused = cache.cache(str(other), "qcow2")
    young = tmp_path / "young.qcow2"
    _img("create", "-q", "-f", "qcow2", str(young), "1M")
    young_unused = cache.cache(str(young), "qcow2")
    day_ago = time.time() - 86400
    for path in (used_base, old_unused):
        os.utime(path, (day_ago, day_ago))
    removed = cache.cleanup([], max_age_seconds=3600)
    assert removed == [old_unused]
    assert used_base.exists() and young_unused.exists()


def test_cleanup_removes_stale_resize_dirs_but_keeps_open_moves(cache: ImageCache, base_image: Path) -> None:
    """Old <uuid>_resize directories go unless their move is still open; foreign names are never touched."""
    base = cache.cache(str(base_image), "qcow2")
    stale, open_move = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    for uuid in (stale, open_move):
        cache.create_overlay(uuid, base, "qcow2", 1).parent.rename(cache.root / f"{uuid}_resize")
    (cache.root / "notes_resize").mkdir()
    day_ago = time.time() - 86400
    for name in (f"{stale}_resize", f"{open_move}_resize", "notes_resize"):
        os.utime(cache.root / name, (day_ago, day_ago))
    removed = cache.cleanup([], max_age_seconds=3600, moving={open_move})
    assert removed == [cache.root / f"{stale}_resize"]
    assert (cache.root / f"{open_move}_resize").exists() and (cache.root / "notes_resize").exists()
    assert base.exists()
    assert cache.cleanup([], max_age_seconds=0) == []  # without the moving set no resize dir is touched
