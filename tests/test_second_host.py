"""The second libvirt host of the tests (``scripts/second-host.sh``): what the engine's tests may rely on.

It is another libvirtd, reached only through libvirt at ``LIFECYCLE_TEST_REMOTE_URI``,
with an instances path that exists on that host alone; storage is reached through
pools and volume streams; the fixtures remove what a test leaves there, and on
``qemu:///system`` the pools a test leaves in its ``tmp_path``.
"""

from __future__ import annotations

import os
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.conftest import (
    QEMU_URI,
    RemoteHost,
    qemu_ready,
    remove_qemu_pools,
    remove_remote_leftovers,
)

pytestmark = pytest.mark.qemu


@contextmanager
def connection(uri: str) -> Iterator[Any]:
    """A libvirt connection to ``uri``, closed at the end."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


def host_uuid(uri: str) -> str:
    """The host UUID the libvirtd at ``uri`` reports in its capabilities."""
    with connection(uri) as conn:
        return str(ET.fromstring(conn.getCapabilities()).findtext("host/uuid"))


def folder_exists(conn: Any, folder: PurePosixPath) -> bool:
    """Whether ``folder`` exists on the host of ``conn``: a transient dir pool there starts only if it does."""
    import libvirt

    xml = f"<pool type='dir'><name>pytest-probe-{uuid.uuid4().hex[:12]}</name><target><path>{folder}</path></target></pool>"
    try:
        pool = conn.storagePoolCreateXML(xml, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR and "No such file or directory" in str(exc):
            return False
        raise
    pool.destroy()  # transient: gone
    return True


def dir_pool(conn: Any, folder: PurePosixPath | Path) -> Any:
    """Define, build and start a ``dir`` pool at ``folder``, named as the engine names its pools."""
    xml = (
        f"<pool type='dir'><name>lifecycle-{uuid.uuid4().hex[:12]}</name><target><path>{folder}</path></target></pool>"
    )
    pool = conn.storagePoolDefineXML(xml, 0)
    pool.build(0)
    pool.create(0)
    return pool


def upload(conn: Any, pool: Any, name: str, data: bytes) -> Any:
    """Create a raw volume of exactly ``len(data)`` bytes in ``pool`` and fill it through a stream."""
    vol = pool.createXML(
        f"<volume><name>{name}</name><capacity unit='B'>{len(data)}</capacity>"
        "<allocation>0</allocation><target><format type='raw'/></target></volume>",
        0,
    )
    stream = conn.newStream(0)
    vol.upload(stream, 0, len(data), 0)
    sent = 0

    def source(_st: Any, nbytes: int, _op: None) -> bytes:
        nonlocal sent
        chunk = data[sent : sent + nbytes]
        sent += len(chunk)
        return chunk

    stream.sendAll(source, None)
    stream.finish()
    return vol


def download(conn: Any, vol: Any) -> bytes:
    """Read all of ``vol`` through a stream."""
    stream = conn.newStream(0)
    vol.download(stream, 0, 0, 0)
    got = bytearray()

    def sink(_st: Any, buf: bytes, _op: None) -> int:
        got.extend(buf)
        return len(buf)

    stream.recvAll(sink, None)
    stream.finish()
    return bytes(got)


def qcow2_bytes(tmp_path: Path) -> bytes:
    """The bytes of an empty 64 MiB qcow2 image made by qemu-img (about 200 KB)."""
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path.read_bytes()


def test_remote_host_is_another_libvirtd(remote_host: RemoteHost) -> None:
    """The remote URI answers with a host UUID of its own, not that of qemu:///system."""
    qemu_ready()
    assert host_uuid(remote_host.uri) != host_uuid(QEMU_URI)


def test_remote_pidfile_names_its_libvirtd_in_another_mount_namespace(remote_host: RemoteHost) -> None:
    """The remote pidfile names a running libvirtd whose filesystem view is not the engine's."""
    pid = int(remote_host.pidfile.read_text().strip())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd"
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")


def test_remote_instances_path_exists_on_the_remote_host_only(
    remote_host: RemoteHost, remote_instances: PurePosixPath
) -> None:
    """The remote instances path exists on the second host but not on the engine's filesystem."""
    assert not Path(remote_host.instances_path).exists()
    assert remote_instances.parent == remote_host.instances_path
    with connection(remote_host.uri) as conn:
        assert folder_exists(conn, remote_host.instances_path)
        assert not folder_exists(conn, remote_instances)  # the per-test folder is not made for the test
    assert not Path(remote_host.instances_path).exists()


def test_remote_pool_volume_round_trips_through_streams(
    remote_host: RemoteHost, remote_instances: PurePosixPath, tmp_path: Path
) -> None:
    """A dir pool built at a per-test path on the remote host takes a volume by upload and gives it back by download."""
    data = qcow2_bytes(tmp_path)
    with connection(remote_host.uri) as conn:
        pool = dir_pool(conn, remote_instances / "images")
        vol = upload(conn, pool, "base.qcow2", data)
        assert PurePosixPath(vol.path()) == remote_instances / "images" / "base.qcow2"
        assert download(conn, vol) == data
        assert not Path(vol.path()).exists()


def test_remote_leftovers_are_removed_by_the_fixture_clean_up(
    remote_host: RemoteHost, remote_instances: PurePosixPath, tmp_path: Path
) -> None:
    """The remote clean-up removes a running domain, the pool and its volumes under the test's folder, and the folder."""
    import libvirt

    data = qcow2_bytes(tmp_path)
    name = f"pytest-{uuid.uuid4().hex[:12]}"
    with connection(remote_host.uri) as conn:
        pool = dir_pool(conn, remote_instances / "images")
        base = upload(conn, pool, "base.qcow2", data)
        overlay = pool.createXML(
            "<volume><name>disk</name><capacity unit='MiB'>64</capacity><target><format type='qcow2'/></target>"
            f"<backingStore><path>{base.path()}</path><format type='qcow2'/></backingStore></volume>",
            0,
        )
        dom = conn.defineXML(
            f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
            f"<driver name='qemu' type='qcow2'/><source file='{overlay.path()}'/>"
            "<target dev='vda' bus='virtio'/></disk></devices></domain>"
        )
        dom.create()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        pool_name = pool.name()

        removed = remove_remote_leftovers(remote_host.uri, remote_instances)

        assert [r.split()[-1] if r.startswith("pool ") else r.split()[0] for r in removed] == [name, pool_name]
        assert name not in [d.name() for d in conn.listAllDomains()]
        assert pool_name not in [p.name() for p in conn.listAllStoragePools(0)]
        assert not folder_exists(conn, remote_instances / "images")
        assert not folder_exists(conn, remote_instances)
        assert folder_exists(conn, remote_host.instances_path)


def test_local_pools_in_tmp_path_are_removed_with_their_volumes(tmp_path: Path) -> None:
    """The qemu clean-up removes a pool on qemu:///system whose folder is in the test's tmp_path, volumes and all."""
    qemu_ready()
    folder = tmp_path / "instances" / "images"
    with connection(QEMU_URI) as conn:
        pool = dir_pool(conn, folder)
        vol = upload(conn, pool, "base.qcow2", qcow2_bytes(tmp_path))
        assert Path(vol.path()).is_file()
        pool_name = pool.name()

        assert remove_qemu_pools(lambda paths: all(p.is_relative_to(tmp_path) for p in paths)) == [pool_name]

        assert pool_name not in [p.name() for p in conn.listAllStoragePools(0)]
    assert not folder.exists()
