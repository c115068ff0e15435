"""Shelve, offload and unshelve on two real libvirt hosts, through the CLI, with data on the disk.

A guest on host ``a`` (this machine's libvirtd) gets a pattern written into its disk; it is
shelved (its disk read over ``a``'s libvirt connection into the engine's image store), offloaded
(domain and disk gone from ``a``, claims released), and unshelved onto host ``b`` (the second
libvirtd, reached only over ``qemu+tcp://``). The data must come back: the disk's logical content
(every byte the guest sees, read through its backing image) hashes the same before the shelve and
on ``b`` after the unshelve. The disk on ``b`` is laid out as any spawned disk: a qcow2 overlay on
``../_base/<key>`` of the instance's own image, so later moves copy it as they copy any disk.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.test_fleet_qemu import RUNNING, SHUTOFF, Fleet, HostView, fleet  # noqa: F401

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

PATTERN = ("0x5a", "96M", "16M")
"""What the test writes into the guest's disk before the shelve: qemu-io's pattern, offset and length."""


def _content_digest(disk: Path) -> str:
    """The sha256 of a qcow2 disk's logical content (through its backing chain), as raw bytes."""
    raw = disk.with_name(disk.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(raw)], check=True)
    digest = hashlib.sha256()
    with raw.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    raw.unlink()
    return digest.hexdigest()


def _remote_content_digest(view: HostView, uuid: str, base_image: Path, work: Path) -> str:
    """Download a remote disk volume and hash its logical content, its ``../_base/<key>`` resolved locally."""
    import libvirt

    backing = view.backing(uuid)
    assert backing.endswith(f"/disks/../_base/{backing.rsplit('/', 1)[-1]}"), backing  # as any spawned disk
    (work / "_base").mkdir(parents=True)
    (work / "_base" / backing.rsplit("/", 1)[-1]).symlink_to(base_image)
    (work / "disks").mkdir()
    local = work / "disks" / uuid
    with view.conn() as conn, local.open("wb") as out:
        pool = view._pool(conn, "disks")
        assert pool is not None
        vol = view._volume(conn, uuid)
        stream = conn.newStream(0)
        vol.download(stream, 0, 0, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)

        def data(_s: object, buf: bytes, _o: None) -> int:
            return out.write(buf)

        def hole(_s: object, length: int, _o: None) -> int:
            out.seek(length, 1)
            return 0

        stream.sparseRecvAll(data, hole, None)
        stream.finish()
        out.truncate()
    return _content_digest(local)


def _stopped_with_data(on: Fleet, name: str) -> tuple[str, str]:
    """An instance on a, stopped, with PATTERN written into its disk; return its uuid and content digest."""
    uuid = on.create(name, "a")
    assert on.ok("stop", uuid, "--timeout", "0")["status"] == "SHUTOFF"
    disk = Path(on.a.instances) / "disks" / on.here("show", uuid)["disk"]
    pattern, offset, length = PATTERN
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(disk)],
        check=True,
        capture_output=True,
    )
    return uuid, _content_digest(disk)


def _image_names(on: Fleet) -> set[str]:
    return {i["name"] for i in on.here("image", "list")}


def test_shelve_offload_unshelve_on_the_other_host_keeps_the_data(fleet: Fleet, base_image: Path) -> None:  # noqa: F811
    """Shelved on a (offloaded at once), unshelved onto b: the data comes back and a holds nothing of it."""
    uuid, before = _stopped_with_data(fleet, "sleeper")
    fleet.ok("start", uuid)

    shelved = fleet.ok("shelve", uuid)
    assert (shelved["vm_state"], shelved["host"], shelved["status"]) == ("shelved_offloaded", None, "SHELVED_OFFLOADED")
    assert fleet.a.domain(uuid) is None and uuid not in fleet.a.volumes()
    assert fleet.hosts()["a"]["memory_mb_used"] == 0  # the claim went with the host
    snapshot = next(i for i in fleet.here("image", "list") if i["name"] == f"shelved-{uuid}")
    info = subprocess.run(["qemu-img", "info", snapshot["path"]], capture_output=True, text=True, check=True).stdout
    assert "backing file" not in info  # an image of its own, whole
    steps = [s["name"] for t in fleet.here("tasks", uuid) if t["operation"] == "shelve" for s in t["steps"]]
    assert steps == ["shelving", "shelving_image_pending_upload", "shelving_image_uploading", "shelving_offloading"]

    back = fleet.ok("unshelve", uuid, "--host", "b")
    assert (back["vm_state"], back["host"], back["status"]) == ("active", "b", "ACTIVE")
    assert fleet.b.state(uuid) == RUNNING and fleet.a.domain(uuid) is None
    assert f"shelved-{uuid}" not in _image_names(fleet) and not Path(snapshot["path"]).exists()
    assert fleet.ok("stop", uuid, "--timeout", "0")["status"] == "SHUTOFF"
    assert _remote_content_digest(fleet.b, uuid, base_image, fleet.tmp_path / "check") == before
    assert fleet.ok("delete", uuid)["vm_state"] == "deleted"


def test_the_daemon_offloads_after_shelved_offload_time_and_unshelve_brings_it_back(fleet: Fleet) -> None:  # noqa: F811
    """With shelved_offload_time 1 s the shelve keeps the host; the daemon offloads it; unshelve restores data."""
    uuid, before = _stopped_with_data(fleet, "napper")
    keep = {"shelved_offload_time": 1}
    shelved = fleet.ok("shelve", uuid, settings=keep)
    assert (shelved["vm_state"], shelved["host"]) == ("shelved", "a")
    assert fleet.a.state(uuid) == SHUTOFF  # still defined there, off

    daemon = fleet.start("daemon", "--host", "a", "--interval", "3600", settings=keep)
    try:
        wait_until("the daemon offloads it", lambda: fleet.show(uuid)["vm_state"] == "shelved_offloaded", 60)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    assert fleet.a.domain(uuid) is None and uuid not in fleet.a.volumes()
    history = fleet.here("history", uuid)
    assert any(e["operation"] == "shelve_offload" and e["cause"] == "timer" for e in history)

    back = fleet.ok("unshelve", uuid, "--host", "a")
    assert (back["vm_state"], back["host"]) == ("active", "a")
    assert fleet.ok("stop", uuid, "--timeout", "0")["status"] == "SHUTOFF"
    assert _content_digest(Path(fleet.a.instances) / "disks" / fleet.here("show", uuid)["disk"]) == before
    assert fleet.ok("delete", uuid)["vm_state"] == "deleted"


def test_a_shelved_guest_kept_on_its_host_unshelves_in_place_and_deletes_clean(fleet: Fleet) -> None:  # noqa: F811
    """Unshelve of a shelved (not offloaded) guest powers it on where it is; a delete of a shelved one drops its snapshot."""
    uuid = fleet.create("dozer", "b")
    keep = {"shelved_offload_time": 3600}
    assert fleet.ok("shelve", uuid, settings=keep)["vm_state"] == "shelved"
    refused = fleet.run("unshelve", uuid, "--host", "a", "--json", settings=keep)
    assert refused.returncode == 2 and "only for an offloaded instance" in refused.stderr + refused.stdout
    back = fleet.ok("unshelve", uuid, settings=keep)
    assert (back["vm_state"], back["host"]) == ("active", "b") and fleet.b.state(uuid) == RUNNING
    assert f"shelved-{uuid}" not in _image_names(fleet)

    assert fleet.ok("shelve", uuid)["vm_state"] == "shelved_offloaded"
    path = Path(next(i["path"] for i in fleet.here("image", "list") if i["name"] == f"shelved-{uuid}"))
    started = time.monotonic()
    assert fleet.ok("delete", uuid)["vm_state"] == "deleted"
    assert time.monotonic() - started < 60
    assert f"shelved-{uuid}" not in _image_names(fleet) and not path.exists()
    assert fleet.b.domain(uuid) is None and uuid not in fleet.b.volumes()
