"""Image inspection with the real qemu-img, on the engine's side, before an image goes to any host.

The image cache itself lives on the hosts, as libvirt volumes (tests/test_storage.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lifecycle.drivers.images import UnsafeImage, inspect_image, valid_uuid
from lifecycle.drivers.storage import HostStorage
from lifecycle.errors import DriverError

pytestmark = pytest.mark.libvirt


def _img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_a_plain_qcow2_is_accepted_with_its_size(base_image: Path) -> None:
    """A qcow2 without backing or data file passes inspection and reports its format and virtual size."""
    info = inspect_image(base_image, "qcow2")
    assert (info.path, info.format, info.virtual_size) == (str(base_image), "qcow2", 64 * 1024**2)
    assert (info.backing_file, info.data_file) == (None, None)


def test_backing_file_outside_the_cache_is_refused(tmp_path: Path) -> None:
    """A qcow2 whose backing file is a host file (CVE-2024-32498 class) is refused."""
    secret = tmp_path / "host-secret"
    secret.write_text("root:x:0:0")
    evil = tmp_path / "evil.qcow2"
    _img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(evil), "1M")
    with pytest.raises(UnsafeImage, match=r"backing file .* outside the image cache"):
        inspect_image(evil, "qcow2")


def test_backing_file_inside_the_allowed_dir_is_accepted(tmp_path: Path) -> None:
    """A backing file is accepted only inside the allowed directory (and refused when there is none)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    _img("create", "-q", "-f", "raw", str(allowed / "base.raw"), "1M")
    overlay = allowed / "overlay.qcow2"
    _img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", str(overlay), "1M")
    assert inspect_image(overlay, "qcow2", allowed).backing_file == str(allowed / "base.raw")
    with pytest.raises(UnsafeImage, match="backing file"):
        inspect_image(overlay, "qcow2")


def test_data_file_outside_the_cache_is_refused(tmp_path: Path) -> None:
    """A qcow2 with an external data file is refused."""
    evil = tmp_path / "datafile.qcow2"
    _img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'external.raw'}", str(evil), "1M")
    with pytest.raises(UnsafeImage, match="data file"):
        inspect_image(evil, "qcow2")


@pytest.mark.parametrize(("real", "declared"), [("qcow2", "raw"), ("raw", "qcow2")])
def test_format_mismatch_is_refused(tmp_path: Path, real: str, declared: str) -> None:
    """An image whose contents are not the declared format is refused (a qcow2 posing as raw)."""
    image = tmp_path / f"image.{real}"
    _img("create", "-q", "-f", real, str(image), "1M")
    with pytest.raises(UnsafeImage, match=f"declared {declared} but its contents are {real}"):
        inspect_image(image, declared)


def test_unknown_format_and_missing_file_are_refused(base_image: Path, tmp_path: Path) -> None:
    """Only qcow2 and raw are accepted, and the file must exist."""
    with pytest.raises(UnsafeImage):
        inspect_image(base_image, "vmdk")
    with pytest.raises(DriverError, match="does not exist"):
        inspect_image(tmp_path / "nope.qcow2", "qcow2")


@pytest.mark.parametrize(
    "bad", ["../../etc", "6a0b7c2e-8f4e-4d1a-9b0a-1234567890ab/../x", "6A0B7C2E-8F4E-4D1A-9B0A-1234567890AB", ""]
)
def test_names_are_built_only_from_valid_uuids(bad: str) -> None:
    """A uuid that is not canonical (traversal, case, empty) is refused before it can name anything on a host."""
    good = "6a0b7c2e-8f4e-4d1a-9b0a-1234567890ab"
    with pytest.raises(DriverError):
        valid_uuid(bad)
    with pytest.raises(DriverError):
        HostStorage("/instances").disk_names(bad)
    assert valid_uuid(good) == good
    assert HostStorage("/instances").disk_names(good) == (good, f"{good}.rescue")
