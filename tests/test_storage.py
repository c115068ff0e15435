"""A host's disks through libvirt's storage API, on real libvirtd: pools, the base cache, disk volumes, moves.

Every test runs on QEMU_URI with instances paths under its own tmp_path, and
removes the domains and pools it made (:func:`remove_pools`). The host is this
machine, so a test may read a volume's file to check it; the driver never does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lifecycle.drivers.libvirt._disks
import lifecycle.drivers.storage
from lifecycle.drivers.base import DomainSpec
from lifecycle.drivers.images import inspect_image
from lifecycle.drivers.libvirt import LibvirtDriver
from lifecycle.drivers.storage import Content, HostStorage, image_key
from lifecycle.errors import CopyFailed, DomainNotFound
from lifecycle.states import PowerState
from tests.conftest import QEMU_URI, qemu_ready

pytestmark = pytest.mark.qemu

MiB = 1024**2


def remove_pools(storage: HostStorage, uri: str = QEMU_URI) -> None:
    """Delete the volumes of a host's two pools, then stop and undefine the pools; missing pools are skipped."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        storage.drop(conn)
    finally:
        conn.close()


class Hosts:
    """Libvirt hosts on QEMU_URI, one per instances path under tmp_path, and the instances the test made."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.drivers: list[LibvirtDriver] = []
        self.uuids: list[str] = []

    def open(self, name: str = "instances") -> LibvirtDriver:
        drv = LibvirtDriver(QEMU_URI, self.tmp_path / name, domain_type="qemu", soft_reboot_seconds=1)
        self.drivers.append(drv)
        return drv

    def spec(self, image: Path, root_gb: int = 1) -> DomainSpec:
        spec = DomainSpec(str(uuidlib.uuid4()), "storage-vm", 1, 64, root_gb, str(image), "qcow2")
        self.uuids.append(spec.uuid)
        return spec

    def close(self) -> None:
        try:
            for drv in self.drivers:
                for uuid in self.uuids:
                    drv.destroy(uuid)
        finally:
            for path in dict.fromkeys(drv.storage.instances_path for drv in self.drivers):
                remove_pools(HostStorage(path))
            for drv in self.drivers:
                drv.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    """Open hosts on QEMU_URI; afterwards their domains are destroyed and their pools removed."""
    qemu_ready()
    made = Hosts(tmp_path)
    yield made
    made.close()


@pytest.fixture
def host(hosts: Hosts) -> LibvirtDriver:
    """One host on QEMU_URI with the instances path tmp_path/instances."""
    return hosts.open()


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the volumes uploaded into a host's image cache, in order (a wrapper on the cache's upload)."""
    seen: list[str] = []
    real = lifecycle.drivers.storage.write_volume

    def counting(conn: Any, vol: Any, *args: Any, **kwargs: Any) -> Content:
        seen.append(vol.name())
        return real(conn, vol, *args, **kwargs)

    monkeypatch.setattr(lifecycle.drivers.storage, "write_volume", counting)
    return seen


def _conn(drv: LibvirtDriver) -> Any:
    return drv._conns.get("test")


def _volumes(drv: LibvirtDriver, pool: str) -> set[str]:
    """The names of a pool's volumes, read fresh."""
    found = drv.storage.pool(_conn(drv), pool)
    found.refresh(0)
    return {vol.name() for vol in found.listAllVolumes(0)}


def _volume(drv: LibvirtDriver, pool: str, name: str) -> Any:
    vol = drv.storage.volume(_conn(drv), pool, name)
    assert vol is not None, f"no volume {name} in {pool}"
    return vol


def backed_by_cache(drv: LibvirtDriver, uuid: str, key: str) -> bool:
    """Whether an instance's disk volume is an overlay on the host's cached base ``key``, named relatively.

    libvirt reports the backing store as written (``../_base/<key>``) until a
    pool refresh, then joined to the disk's directory: both must resolve to
    the cache pool's volume. The file itself must name it ``../_base/<key>``,
    which is what makes a copied disk valid on any host.
    """
    disk = _volume(drv, drv.storage.disks_pool, uuid)
    backing = ET.fromstring(disk.XMLDesc(0)).findtext("./backingStore/path")
    if backing is None or not backing.endswith(f"../_base/{key}"):
        return False
    resolved = os.path.normpath(os.path.join(os.path.dirname(disk.path()), backing))
    info = json.loads(_img("info", "-U", "--output=json", disk.path()))
    return (
        resolved == _volume(drv, drv.storage.cache_pool, key).path() and info["backing-filename"] == f"../_base/{key}"
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def _disk_with_a_hole(drv: LibvirtDriver, uuid: str) -> Path:
    """Write 16 MiB into an instance's (stopped) disk and discard its first 8 MiB: data with a hole in the file."""
    path = Path(_volume(drv, drv.storage.disks_pool, uuid).path())
    ops = ["-c", "write -q -P 0x5a 0 16M", "-c", "discard -q 0 8M"]
    subprocess.run(["qemu-io", "-f", "qcow2", "-d", "unmap", *ops, str(path)], check=True, capture_output=True)
    assert path.stat().st_size - os.stat(path).st_blocks * 512 >= 7 * MiB, "the discard left no hole in the file"
    return path


def _kept_for_a_move(hosts: Hosts, image: Path) -> tuple[LibvirtDriver, LibvirtDriver, DomainSpec]:
    """A source host holding a kept disk (with data and a hole) of a move, and an empty destination host."""
    source, dest = hosts.open("source"), hosts.open("dest")
    spec = hosts.spec(image)
    source.spawn(spec, power_on=False)
    _disk_with_a_hole(source, spec.uuid)
    source.migrate_disk_and_power_off(spec.uuid, timeout=0, retry_interval=0)
    return source, dest, spec


def test_pools_are_made_when_missing_and_found_by_a_second_driver(
    hosts: Hosts, base_image: Path, tmp_path: Path, uploads: list[str]
) -> None:
    """A host's missing pools are defined, built, started and set to autostart, and a second driver on the same instances path uses those pools and their cached base."""
    import libvirt

    first = hosts.open()
    conn = _conn(first)
    names = {
        first.storage.cache_pool: tmp_path / "instances" / "_base",
        first.storage.disks_pool: tmp_path / "instances" / "disks",
    }
    for name in names:
        with pytest.raises(libvirt.libvirtError, match="not found"):
            conn.storagePoolLookupByName(name)
    spec = hosts.spec(base_image)
    first.spawn(spec, power_on=False)
    pools = {name: conn.storagePoolLookupByName(name) for name in names}
    for name, pool in pools.items():
        assert pool.isPersistent() and pool.isActive() and pool.autostart(), name
        assert ET.fromstring(pool.XMLDesc(0)).findtext("./target/path") == str(names[name])
        assert names[name].is_dir()
    pools[first.storage.disks_pool].destroy()  # stopped behind the driver's back: started again when needed

    second = hosts.open()
    other = hosts.spec(base_image)
    second.spawn(other, power_on=False)
    again = {name: _conn(second).storagePoolLookupByName(name) for name in names}
    assert {n: p.UUIDString() for n, p in again.items()} == {n: p.UUIDString() for n, p in pools.items()}
    assert all(pool.isActive() for pool in again.values())
    assert uploads == [image_key(base_image)]  # the first spawn's; the second found the base cached
    assert _volumes(second, second.storage.disks_pool) == {spec.uuid, other.uuid}


def test_concurrent_spawns_from_one_image_upload_the_base_once(
    host: LibvirtDriver, hosts: Hosts, base_image: Path, uploads: list[str]
) -> None:
    """Two spawns at once of different instances from one image on one host upload its base once, and both disks are backed by that one volume."""
    specs = [hosts.spec(base_image) for _ in range(2)]
    start = threading.Barrier(len(specs))
    errors: list[BaseException] = []

    def spawn(spec: DomainSpec) -> None:
        start.wait()
        try:
            host.spawn(spec, power_on=False)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=spawn, args=(spec,)) for spec in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    key = image_key(base_image)
    assert uploads == [key]
    assert _volumes(host, host.storage.cache_pool) == {key}
    assert all(backed_by_cache(host, spec.uuid, key) for spec in specs)


def test_a_partial_base_left_by_a_dead_uploader_is_replaced(
    host: LibvirtDriver, hosts: Hosts, base_image: Path, uploads: list[str]
) -> None:
    """A base volume shorter than its image that does not grow (its uploader died) is deleted and uploaded again, and the spawn on it runs."""
    key = image_key(base_image)
    pool = host.storage.pool(_conn(host), host.storage.cache_pool)
    xml = f"<volume><name>{key}</name><capacity>65536</capacity><target><format type='raw'/></target></volume>"
    pool.createXML(xml, 0)
    spec = hosts.spec(base_image)
    started = time.monotonic()
    host.spawn(spec)
    assert time.monotonic() - started >= 2, "the partial base was not watched for growth before it was replaced"
    assert uploads == [key]
    assert _sha256(Path(_volume(host, host.storage.cache_pool, key).path())) == key.split("-")[0]
    assert host.get_info(spec.uuid) is PowerState.RUNNING


def test_an_upload_whose_partial_was_replaced_meanwhile_waits_for_the_base_to_be_whole(
    host: LibvirtDriver, hosts: Hosts, base_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled uploader whose partial another process replaced returns the key only once the name holds every byte."""
    key = image_key(base_image)
    size = base_image.stat().st_size
    real, calls = lifecycle.drivers.storage.write_volume, []
    real_growing, watching = lifecycle.drivers.storage._growing, threading.Event()

    def growing(vol: Any) -> bool:
        watching.set()  # the stalled uploader found the other's partial and watches it
        return real_growing(vol)

    def replaced_meanwhile(conn: Any, vol: Any, *args: Any, **kwargs: Any) -> Content:
        content = real(conn, vol, *args, **kwargs)
        if calls:
            return content
        calls.append(vol.name())
        # Meanwhile another process took this upload for abandoned: it deleted it and is uploading its own.
        vol.delete(0)
        pool = host.storage.pool(conn, host.storage.cache_pool)
        other = pool.createXML(
            f"<volume><name>{key}</name><capacity>0</capacity><target><format type='raw'/></target></volume>", 0
        )
        half = base_image.read_bytes()[: size // 2]

        def other_upload() -> None:
            stream = conn.newStream(0)
            other.upload(stream, 0, 0, 0)
            stream.send(half)
            watching.wait(30)  # it goes on once the stalled uploader watches its partial grow
            stream.send(base_image.read_bytes()[size // 2 :])
            stream.finish()

        threading.Thread(target=other_upload, daemon=True).start()
        return content

    monkeypatch.setattr(lifecycle.drivers.storage, "write_volume", replaced_meanwhile)
    monkeypatch.setattr(lifecycle.drivers.storage, "_growing", growing)
    got = host.storage.ensure_base(_conn(host), host.uri, base_image, inspect_image(base_image, "qcow2"))
    assert got == key
    vol = _volume(host, host.storage.cache_pool, key)
    assert int(vol.infoFlags(1)[2]) >= size, "the key was returned while its volume held a partial upload"
    assert _sha256(Path(vol.path())) == key.split("-")[0]


def test_a_cached_base_is_the_image_byte_for_byte(host: LibvirtDriver, hosts: Hosts, tmp_path: Path) -> None:
    """The cache volume holds exactly the image's bytes, also for an image smaller than an empty qcow2 file (no stale tail)."""
    tiny = tmp_path / "tiny.qcow2"
    _img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(tiny), "1M")
    assert tiny.stat().st_size < 64 * 1024
    host.spawn(hosts.spec(tiny), power_on=False)
    cached = Path(_volume(host, host.storage.cache_pool, image_key(tiny)).path())
    assert cached.read_bytes() == tiny.read_bytes()


def test_destroy_removes_root_and_rescue_volumes_and_unrescue_the_rescue_one(
    host: LibvirtDriver, hosts: Hosts, base_image: Path
) -> None:
    """unrescue deletes the rescue volume and keeps the root one; destroy deletes both (the cached base stays)."""
    spec = hosts.spec(base_image)
    rescue = f"{spec.uuid}.rescue"
    host.spawn(spec)
    host.rescue(spec)
    assert _volumes(host, host.storage.disks_pool) == {spec.uuid, rescue}
    host.unrescue(spec)
    assert _volumes(host, host.storage.disks_pool) == {spec.uuid}
    host.rescue(spec)
    assert _volumes(host, host.storage.disks_pool) == {spec.uuid, rescue}
    host.destroy(spec.uuid)
    assert _volumes(host, host.storage.disks_pool) == set()
    assert _volumes(host, host.storage.cache_pool) == {image_key(base_image)}


def test_cleanup_removes_only_old_unused_bases(
    host: LibvirtDriver, hosts: Hosts, base_image: Path, tmp_path: Path
) -> None:
    """cleanup_images deletes a cached base unused and older than the age, and keeps an old one behind a disk (a move's kept disk) and a young unused one."""
    old, young = tmp_path / "old.qcow2", tmp_path / "young.qcow2"
    _img("create", "-q", "-f", "qcow2", str(old), "1M")
    _img("create", "-q", "-f", "qcow2", str(young), "2M")
    kept = hosts.spec(base_image)
    host.spawn(kept, power_on=False)
    host.migrate_disk_and_power_off(kept.uuid, timeout=0, retry_interval=0)  # no domain; the disk is kept
    for image in (old, young):
        spec = hosts.spec(image)
        host.spawn(spec, power_on=False)
        host.destroy(spec.uuid)  # the disk goes, its base stays cached, unused
    used, old_key, young_key = image_key(base_image), image_key(old), image_key(young)
    assert _volumes(host, host.storage.cache_pool) == {used, old_key, young_key}
    day_ago = time.time() - 86400
    for key in (used, old_key):
        os.utime(_volume(host, host.storage.cache_pool, key).path(), (day_ago, day_ago))
    assert host.cleanup_images(3600) == [f"{host.storage.cache_pool}/{old_key}"]
    assert _volumes(host, host.storage.cache_pool) == {used, young_key}
    assert host.cleanup_images(3600) == []


def test_a_copy_stopped_by_its_progress_callback_leaves_nothing_on_the_destination(
    hosts: Hosts, base_image: Path
) -> None:
    """An error raised by the progress callback (a task taken over) stops the copy at that chunk, reaches the caller, and leaves no volume or domain of the instance on the destination."""

    class TakenOver(Exception):
        pass

    source, dest, spec = _kept_for_a_move(hosts, base_image)
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 3:
            raise TakenOver(f"stopped at {done} of {total}")

    with pytest.raises(TakenOver):
        dest.finish_migration(spec, functools.partial(source.read_disk, spec.uuid), power_on=False, progress=progress)
    assert len(calls) == 3
    assert spec.uuid not in _volumes(dest, dest.storage.disks_pool)
    with pytest.raises(DomainNotFound):
        dest.get_info(spec.uuid)
    assert spec.uuid in _volumes(source, source.storage.disks_pool)  # the source still keeps it


def test_a_move_copies_only_data_and_arrives_identical(hosts: Hosts, base_image: Path) -> None:
    """A move sends only the disk's data (not its holes) and the destination's disk, sparse too, has the source's content on the destination's own cached base."""
    source, dest, spec = _kept_for_a_move(hosts, base_image)
    src = _volume(source, source.storage.disks_pool, spec.uuid)
    allocation = int(src.info()[2])
    reported: list[tuple[int, int]] = []
    dest.finish_migration(
        spec,
        functools.partial(source.read_disk, spec.uuid),
        power_on=False,
        progress=lambda done, total: reported.append((done, total)),
    )
    done, total = reported[-1]
    assert 8 * MiB <= done <= 1.1 * allocation + MiB
    assert total == done  # the last report gives the exact bytes moved
    assert {t for _, t in reported[:-1]} == {allocation}  # before it, the source's estimate
    dst = _volume(dest, dest.storage.disks_pool, spec.uuid)
    assert int(dst.info()[2]) <= 1.1 * allocation + MiB
    assert backed_by_cache(dest, spec.uuid, image_key(base_image))
    assert _sha256(Path(dst.path())) == _sha256(Path(src.path()))
    _img("compare", "-q", "-f", "qcow2", "-F", "qcow2", src.path(), dst.path())
    dest.power_on(spec)
    assert dest.get_info(spec.uuid) is PowerState.RUNNING


def test_a_disk_that_arrives_different_is_refused_and_deleted(
    hosts: Hosts, base_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the digest read back on the destination differs from the one sent, finish_migration raises CopyFailed and deletes the copy; a repeat with an intact copy succeeds."""
    source, dest, spec = _kept_for_a_move(hosts, base_image)
    read_back: list[str] = []

    def wrong(conn: Any, vol: Any) -> Content:
        read_back.append(vol.name())
        content = Content()
        content.add(b"not what was sent")
        return content

    monkeypatch.setattr(lifecycle.drivers.storage, "volume_digest", wrong)
    monkeypatch.setattr(lifecycle.drivers.libvirt._disks, "volume_digest", wrong)  # the name the driver calls
    read = functools.partial(source.read_disk, spec.uuid)
    with pytest.raises(CopyFailed, match="arrived different from what was sent"):
        dest.finish_migration(spec, read, power_on=False)
    assert read_back == [spec.uuid]
    assert spec.uuid not in _volumes(dest, dest.storage.disks_pool)
    with pytest.raises(DomainNotFound):
        dest.get_info(spec.uuid)
    monkeypatch.undo()
    dest.finish_migration(spec, read, power_on=False)
    assert dest.get_info(spec.uuid) is PowerState.SHUTDOWN


def test_cleanup_with_keep_removes_orphaned_disks_only(host: LibvirtDriver, hosts: Hosts, base_image: Path) -> None:
    """With keep, an old disk of an instance not kept and used by no domain is removed; a kept one, one a domain uses, and a young one stay."""
    orphan, kept, running, young = (hosts.spec(base_image) for _ in range(4))
    for spec in (orphan, kept, young):
        host.spawn(spec, power_on=False)
        host.migrate_disk_and_power_off(spec.uuid, timeout=0, retry_interval=0)  # the disk alone, no domain
    host.spawn(running, power_on=False)  # a defined domain uses its disk
    day_ago = time.time() - 86400
    for spec in (orphan, kept, running):
        os.utime(_volume(host, host.storage.disks_pool, spec.uuid).path(), (day_ago, day_ago))
    removed = host.cleanup_images(3600, keep=frozenset({kept.uuid}))
    assert removed == [f"{host.storage.disks_pool}/{orphan.uuid}"]
    assert _volumes(host, host.storage.disks_pool) == {kept.uuid, running.uuid, young.uuid}
    assert host.cleanup_images(3600) == []  # without keep, no disk is ever touched
    for spec in (kept, young):
        host.confirm_migration(spec.uuid)
    host.destroy(running.uuid)


@pytest.mark.libvirt
def test_a_libvirtd_that_accepts_but_never_answers_is_unavailable_in_bounded_time(tmp_path: Path) -> None:
    """Opening a connection to a listener that never speaks (a hung libvirtd) raises DriverUnavailable near the deadline."""
    import socket

    from lifecycle.errors import DriverUnavailable

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(DriverUnavailable, match="did not answer"):
            LibvirtDriver(f"qemu+tcp://127.0.0.1:{port}/system", tmp_path / "i", reconnect_seconds=2)
    finally:
        server.close()
    assert time.monotonic() - started < 10
