"""The libvirt driver beyond the contract: XML safety, state table, errors, real QEMU.

libvirt's test driver cannot spawn through the driver (it has no volume
upload, and every disk goes through one): tests on it define the domain
directly, as the driver would (:func:`_define`), and pin what the driver does
with it. What needs a real spawn runs on QEMU; the storage itself is in
tests/test_storage.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

import lifecycle.drivers.storage
from lifecycle import Engine, Flavor, PowerState, Settings, TaskFailed, VmState, upgrade
from lifecycle.drivers.base import DomainSpec, Driver
from lifecycle.drivers.libvirt import _POWER, METADATA_NS, LibvirtDriver, domain_xml
from lifecycle.drivers.storage import HostStorage, image_key
from lifecycle.errors import DomainNotFound, DriverError, DriverUnavailable
from tests.conftest import QEMU_URI, libvirt_ready, private_node_uri, qemu_ready, require, wait_until
from tests.test_storage import backed_by_cache, remove_pools

HOSTILE = "<domain type='kvm'>&amp;\"quotes\" 'and' ünïcødé ☃ ]]></name><devices/>"


def _spec(image: Path | str, name: str = "vm") -> DomainSpec:
    return DomainSpec(str(uuidlib.uuid4()), name, 1, 64, 1, str(image), "qcow2")


def test_hostile_name_is_data_not_markup() -> None:
    """A name full of markup, quotes and non-ASCII comes back out of the XML unchanged, as text."""
    spec = _spec("/images/base.qcow2", HOSTILE)
    root = ET.fromstring(domain_xml(spec, "/i/disk", domain_type="qemu", vnc_listen="127.0.0.1"))
    assert root.findtext("title") == HOSTILE
    assert root.findtext(f"metadata/{{{METADATA_NS}}}instance/{{{METADATA_NS}}}name") == HOSTILE
    assert root.findtext("name") == f"lifecycle-{spec.uuid}"
    assert [d.get("file") for d in root.iter("source")] == ["/i/disk"]
    assert len(root.findall("devices")) == 1


def test_power_table_is_novas() -> None:
    """Libvirt domain states map to power states exactly as Nova's LIBVIRT_POWER_STATE."""
    assert {k: int(v) for k, v in _POWER.items()} == {0: 0, 1: 1, 2: 1, 3: 3, 4: 4, 5: 4, 6: 6, 7: 7}


@pytest.fixture
def test_driver(tmp_path: Path) -> Iterator[LibvirtDriver]:
    """A libvirt test-driver host with a private node file."""
    libvirt_ready()
    drv = LibvirtDriver(private_node_uri(tmp_path), tmp_path / "instances", soft_reboot_seconds=1)
    yield drv
    drv.close()


def _define(drv: LibvirtDriver, spec: DomainSpec, *, start: bool = False) -> None:
    """Define (and start) the domain the driver would for ``spec``, directly on its test-driver connection."""
    xml = domain_xml(spec, "/nonexistent/disk", domain_type="test", vnc_listen="127.0.0.1")
    with drv._calling("define", spec.uuid) as conn:
        dom = conn.defineXML(xml)
        if start:
            dom.create()


@pytest.mark.libvirt
def test_hostile_name_round_trips_through_libvirt(test_driver: LibvirtDriver) -> None:
    """Libvirt stores and returns the hostile name as the domain title, and the driver lists the domain as owned."""
    spec = _spec("/images/base.qcow2", HOSTILE)
    _define(test_driver, spec)
    assert dict(test_driver.list_instances().owned) == {spec.uuid: PowerState.SHUTDOWN}
    with test_driver._calling("test") as conn:
        root = ET.fromstring(conn.lookupByUUIDString(spec.uuid).XMLDesc(0))
    assert root.findtext("title") == HOSTILE


@pytest.mark.libvirt
def test_wrong_state_errors_are_mapped_by_code_and_state(test_driver: LibvirtDriver) -> None:
    """A refused call (test driver code 1) becomes DriverError naming the re-read state and keeping libvirt's text."""
    spec = _spec("/images/base.qcow2")
    _define(test_driver, spec)
    with pytest.raises(DriverError, match="domain is shutdown"):
        test_driver.pause(spec.uuid)
    resume = pytest.raises(DriverError, match=r"^resume failed in libvirt \(code 1, .*; domain is shutdown\): .*not")
    with resume, test_driver._calling("resume", spec.uuid) as conn:
        conn.lookupByUUIDString(spec.uuid).resume()


@pytest.mark.libvirt
def test_missing_domain_is_domain_not_found_with_libvirts_text(test_driver: LibvirtDriver) -> None:
    """A lookup of an unknown uuid is DomainNotFound whose message names the call and carries libvirt's message."""
    missing = str(uuidlib.uuid4())
    with pytest.raises(DomainNotFound) as info:
        test_driver.get_info(missing)
    assert (info.value.uuid, info.value.call) == (missing, "get_info")
    assert str(info.value).startswith(f"get_info: domain for instance {missing} not found: ")
    assert "Domain not found" in str(info.value)
    assert isinstance(info.value.__cause__, _libvirt().libvirtError)


def _libvirt() -> Any:
    import libvirt

    return libvirt


def _libvirt_error(code: int, domain: int, message: str) -> Exception:
    """A real libvirtError whose error tuple says ``code`` from error ``domain`` with ``message``."""
    exc = _libvirt().libvirtError(message)
    exc.err = (code, domain, message, 2, message, None, None, -1, -1)
    return exc


STORAGE_ENOENT = "Cannot access storage file '/gone/disk' (as uid:107, gid:107): No such file or directory"
# (code, error domain, message, expected class): VIR_ERR_SYSTEM_ERROR (38) is a
# lost connection only from VIR_FROM_RPC (7) and VIR_FROM_REMOTE (13).
MAPPING = [
    (38, 18, STORAGE_ENOENT, DriverError),  # VIR_FROM_STORAGE: a missing disk on a live connection
    (38, 10, "cannot open file '/x': Permission denied", DriverError),  # VIR_FROM_QEMU
    (38, 12, "saving domain 'x' to '/y': open failed", DriverError),  # VIR_FROM_TEST
    (38, 13, "Cannot recv data: Connection reset by peer", DriverUnavailable),  # VIR_FROM_REMOTE
    (38, 7, "Failed to connect socket to '/run/libvirt/libvirt-sock'", DriverUnavailable),  # VIR_FROM_RPC
    (4, 0, "no connection driver available", DriverUnavailable),  # VIR_ERR_NO_CONNECT
    (39, 7, "rpc failure", DriverUnavailable),  # VIR_ERR_RPC
    (45, 13, "authentication failed: no agent", DriverUnavailable),  # VIR_ERR_AUTH_FAILED
    (42, 10, "Domain not found: no domain with matching uuid", DomainNotFound),  # VIR_ERR_NO_DOMAIN
    (9, 10, "operation failed: guest CPU doesn't match", DriverError),  # VIR_ERR_OPERATION_FAILED
]


@pytest.mark.libvirt
@pytest.mark.parametrize(("code", "domain", "message", "expected"), MAPPING)
def test_errors_are_classified_by_code_and_error_domain(
    test_driver: LibvirtDriver, code: int, domain: int, message: str, expected: type[DriverError]
) -> None:
    """Each (code, error domain) maps to its class, keeps libvirt's message and the call, and only a lost link drops the connection."""
    conn = test_driver._conns.get("spawn")
    uuid = str(uuidlib.uuid4())
    error = test_driver._map_error(_libvirt_error(code, domain, message), "spawn", uuid, conn)
    assert type(error) is expected
    assert message in str(error) and str(error).startswith("spawn")
    assert (error.call, error.uuid) == ("spawn", uuid)
    assert conn._link.dead is (expected is DriverUnavailable)


@pytest.mark.libvirt
def test_any_error_after_the_close_callback_is_a_lost_connection(test_driver: LibvirtDriver) -> None:
    """Once the close callback dropped the connection, even a non-link error on it is DriverUnavailable."""
    conn = test_driver._conns.get("get_info")
    test_driver._conns.on_close(conn._link.raw, 0, None)  # libvirt hands the callback its own connection object
    error = test_driver._map_error(_libvirt_error(1, 12, "internal error: x"), "get_info", str(uuidlib.uuid4()), conn)
    assert type(error) is DriverUnavailable
    assert str(error).endswith("lost: internal error: x")
    assert test_driver._conns.get("get_info")._link is not conn._link  # the next call opened a new connection


@pytest.mark.libvirt
def test_os_error_on_a_live_connection_is_permanent(test_driver: LibvirtDriver, tmp_path: Path) -> None:
    """A real OS error from the test driver (code 38, not from RPC) is a DriverError with libvirt's text; the connection is kept."""
    spec = _spec("/images/base.qcow2")
    _define(test_driver, spec, start=True)
    before = test_driver._conns.get("save")
    with pytest.raises(DriverError) as info, test_driver._calling("save", spec.uuid) as conn:
        conn.lookupByUUIDString(spec.uuid).save(str(tmp_path / "missing" / "save.img"))
    assert type(info.value) is DriverError
    assert str(info.value).startswith("save failed in libvirt (code 38, error domain 12")
    assert "No such file or directory" in str(info.value)
    assert info.value.__cause__ is not None and info.value.__cause__.get_error_code() == 38  # type: ignore[attr-defined]
    assert test_driver._conns.first is before._link
    assert test_driver.get_info(spec.uuid) is PowerState.RUNNING


@pytest.mark.libvirt
def test_foreign_domains_are_reported_not_owned(test_driver: LibvirtDriver) -> None:
    """A domain the engine did not define is listed as foreign, never as an instance."""
    with test_driver._calling("define") as conn:
        conn.defineXML(
            "<domain type='test'><name>someone-else</name><memory>65536</memory><os><type>hvm</type></os></domain>"
        )
    spec = _spec("/images/base.qcow2")
    _define(test_driver, spec, start=True)
    listing = test_driver.list_instances()
    assert dict(listing.owned) == {spec.uuid: PowerState.RUNNING}
    assert listing.foreign == ("someone-else",)


@pytest.mark.libvirt
def test_engine_refuses_a_malicious_image_at_spawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Create with an image whose backing file is a host file fails, goes to error, and nothing reaches the host.

    The image is inspected on the engine's side before any upload: no volume
    and no domain on the host afterwards (this runs on the test driver, which
    could not take an upload anyway).
    """
    libvirt_ready()
    uploads: list[str] = []
    real_upload = lifecycle.drivers.storage.write_volume

    def counting(conn: Any, vol: Any, *args: Any, **kwargs: Any) -> Any:
        uploads.append(vol.name())
        return real_upload(conn, vol, *args, **kwargs)

    monkeypatch.setattr(lifecycle.drivers.storage, "write_volume", counting)
    secret = tmp_path / "secret"
    secret.write_text("host data")
    evil = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(evil), "1M"], check=True
    )
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    with Engine(url) as engine:
        engine.hosts.add("lv1", private_node_uri(tmp_path), str(tmp_path / "instances"))
        engine.images.add("evil", str(evil))
        with pytest.raises(TaskFailed, match="outside the image cache") as info:
            engine.create("victim", host="lv1", flavor=Flavor(1, 64, 1), image="evil")
        assert engine.get(info.value.task.instance_uuid).vm_state is VmState.ERROR
        host = engine.hosts.driver("lv1")
        assert host.list_instances().owned == {}
        assert isinstance(host, LibvirtDriver)
        with host._calling("volumes") as conn:
            pools = conn.listAllStoragePools(0)
            assert [vol.name() for pool in pools for vol in pool.listAllVolumes(0)] == []
    assert uploads == []


# -- real QEMU under libvirtd ------------------------------------------------------------


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[LibvirtDriver]:
    """A driver on the real libvirtd with TCG guests; every domain it made is destroyed after."""
    qemu_ready()
    drv = LibvirtDriver(QEMU_URI, tmp_path / "instances", domain_type="qemu", soft_reboot_seconds=1)
    yield drv
    try:
        for uuid in drv.list_instances().owned:
            if uuid in made:
                drv.destroy(uuid)
    finally:
        made.clear()
        remove_pools(drv.storage)
        drv.close()


made: set[str] = set()


def _running(drv: LibvirtDriver, base: Path) -> DomainSpec:
    spec = _spec(base)
    made.add(spec.uuid)
    drv.spawn(spec)
    return spec


def _virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", QEMU_URI, *args], check=True, capture_output=True)


@pytest.mark.qemu
def test_clean_stop_of_a_guest_without_os_falls_back_to_destroy(qemu: LibvirtDriver, base_image: Path) -> None:
    """A guest with no OS ignores ACPI: power_off waits out the timeout, destroys it and reports unclean."""
    spec = _running(qemu, base_image)
    assert qemu.power_off(spec.uuid, timeout=1, retry_interval=0.5) is False
    assert qemu.get_info(spec.uuid) is PowerState.SHUTDOWN


@pytest.mark.qemu
def test_out_of_band_virsh_destroy_is_seen_as_shutdown(qemu: LibvirtDriver, base_image: Path) -> None:
    """`virsh destroy` behind our back shows up as SHUTDOWN in get_info and the listing."""
    spec = _running(qemu, base_image)
    _virsh("destroy", f"lifecycle-{spec.uuid}")
    assert qemu.get_info(spec.uuid) is PowerState.SHUTDOWN
    assert qemu.list_instances().owned[spec.uuid] is PowerState.SHUTDOWN


@pytest.mark.qemu
def test_starting_a_guest_whose_disk_is_gone_is_a_permanent_error(qemu: LibvirtDriver, base_image: Path) -> None:
    """A defined guest whose disk file was deleted fails to start with a non-transient DriverError carrying libvirt's text."""
    spec = _spec(base_image)
    made.add(spec.uuid)
    qemu.spawn(spec, power_on=False)
    with qemu._calling("test") as conn:
        disk = ET.fromstring(conn.lookupByUUIDString(spec.uuid).XMLDesc(0)).find("devices/disk/source")
        assert disk is not None
        conn.storageVolLookupByPath(disk.get("file")).delete(0)
    with pytest.raises(DriverError, match="Cannot access storage file") as info:
        qemu.spawn(spec)
    assert not isinstance(info.value, DriverUnavailable)
    assert str(info.value).startswith("spawn failed in libvirt")
    assert qemu.get_info(spec.uuid) is PowerState.SHUTDOWN


@pytest.mark.qemu
def test_console_port_speaks_rfb(qemu: LibvirtDriver, base_image: Path) -> None:
    """The VNC port from the live XML accepts a TCP connection that greets with RFB."""
    spec = _running(qemu, base_image)
    console = qemu.get_vnc_console(spec.uuid)
    with socket.create_connection((console.host, console.port), timeout=5) as sock:
        assert sock.recv(12).startswith(b"RFB ")


@pytest.mark.qemu
def test_disk_is_a_volume_on_the_cached_base(qemu: LibvirtDriver, base_image: Path) -> None:
    """A running guest boots from its volume in the disks pool, an overlay on the image's volume in the cache pool."""
    spec = _running(qemu, base_image)
    key = image_key(base_image)
    with qemu._calling("test") as conn:
        root = ET.fromstring(conn.lookupByUUIDString(spec.uuid).XMLDesc(0))
        disk = qemu.storage.volume(conn, qemu.storage.disks_pool, spec.uuid)
        assert disk is not None
        assert [s.get("file") for s in root.iterfind("devices/disk/source")] == [disk.path()]
        assert {vol.name() for vol in qemu.storage.bases(conn)} == {key}
    assert backed_by_cache(qemu, spec.uuid, key)


@pytest.mark.qemu
def test_lifecycle_events_arrive_from_qemu(qemu: LibvirtDriver, base_image: Path) -> None:
    """An out-of-band destroy produces a STOPPED event for that instance on the listener."""
    spec = _running(qemu, base_image)
    stopped = threading.Event()
    qemu.register_event_listener(
        lambda e: stopped.set() if e.uuid == spec.uuid and e.transition.value == "stopped" else None
    )
    _virsh("destroy", f"lifecycle-{spec.uuid}")
    assert stopped.wait(10)
    qemu.register_event_listener(None)


@pytest.mark.qemu
@pytest.mark.slow
def test_libvirtd_restart_is_survived_by_reconnecting(qemu: LibvirtDriver, base_image: Path) -> None:
    """While libvirtd restarts calls fail with DriverUnavailable; afterwards the driver reconnects and the guest still runs."""
    pidfile = os.environ.get("LIFECYCLE_LIBVIRTD_PIDFILE", "")
    require(
        "a libvirtd started by the test command",
        bool(pidfile) and Path(pidfile).exists(),
        "run `make test`, which starts libvirtd with a pidfile and sets LIFECYCLE_LIBVIRTD_PIDFILE",
    )
    spec = _running(qemu, base_image)
    pid = int(Path(pidfile).read_text().strip())
    os.kill(pid, signal.SIGTERM)
    wait_until("libvirtd gone after SIGTERM", lambda: not _alive(pid), 30, interval=0.1)
    qemu.reconnect_seconds = 0.5
    with pytest.raises(DriverUnavailable):
        qemu.get_info(spec.uuid)
    subprocess.run(["libvirtd", "-d", "-p", pidfile], check=True)
    qemu.reconnect_seconds = 30
    assert qemu.get_info(spec.uuid) is PowerState.RUNNING
    qemu.destroy(spec.uuid)
    assert spec.uuid not in qemu.list_instances().owned


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _disk_volumes(drv: Driver) -> set[str]:
    """The instances (and rescue disks) the volumes of a libvirt host's disks pool belong to, one volume each."""
    assert isinstance(drv, LibvirtDriver)
    with drv._calling("test") as conn:
        names = [_owner(vol.name()) for vol in drv.storage.disks(conn)]
    assert len(names) == len(set(names)), f"more than one root volume of an instance: {names}"
    return set(names)


def _owner(volume: str) -> str:
    """Return the instance a root volume belongs to (``<uuid>.<attempt tag>``), or a rescue disk's own name."""
    return volume if volume.endswith(".rescue") else volume.split(".", 1)[0]


@pytest.mark.qemu
@pytest.mark.slow
def test_engine_drives_a_libvirt_host(tmp_path: Path, base_image: Path) -> None:
    """The engine runs every power operation on a real libvirt host; rescue adds a rescue volume, unrescue and delete remove the volumes."""
    qemu_ready()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    settings = Settings(
        libvirt_domain_type="qemu", shutdown_timeout=1, shutdown_retry_interval=0.5, soft_reboot_seconds=1
    )
    try:
        with Engine(url, settings=settings) as engine:
            engine.hosts.add("lv1", QEMU_URI, str(tmp_path / "instances"))
            engine.images.add("base", str(base_image))
            uuid = engine.create("web", host="lv1", flavor=Flavor(1, 64, 1), image="base").instance_uuid
            host = engine.hosts.driver("lv1")
            assert _disk_volumes(host) == {uuid}
            ops = ("stop", "start", "reboot", "pause", "unpause", "suspend", "resume", "rescue", "unrescue", "rebuild")
            for op in ops:
                engine.run(op, uuid)
                assert _disk_volumes(host) == ({uuid, f"{uuid}.rescue"} if op == "rescue" else {uuid}), op
            engine.reboot(uuid, hard=True)
            assert (engine.get(uuid).vm_state, engine.get(uuid).power_state) == (VmState.ACTIVE, PowerState.RUNNING)
            engine.delete(uuid)
            assert _disk_volumes(host) == set()
            assert uuid not in host.list_instances().owned
    finally:
        remove_pools(HostStorage(str(tmp_path / "instances")))


@pytest.mark.qemu
@pytest.mark.slow
def test_engine_on_real_qemu_with_a_console(tmp_path: Path, base_image: Path) -> None:
    """Through the engine on real QEMU: create, a console token that reaches RFB, a clean stop that falls back, delete."""
    qemu_ready()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    settings = Settings(libvirt_domain_type="qemu", shutdown_timeout=1, shutdown_retry_interval=0.5)
    try:
        with Engine(url, settings=settings) as engine:
            engine.hosts.add("q1", QEMU_URI, str(tmp_path / "instances"))
            engine.images.add("base", str(base_image))
            uuid = engine.create("real", host="q1", flavor=Flavor(1, 64, 1), image="base").instance_uuid
            connection = engine.consoles.check_token(engine.consoles.get_vnc_console(uuid).token)
            assert connection is not None
            with socket.create_connection((connection.host, connection.port), timeout=5) as sock:
                assert sock.recv(4) == b"RFB "
            engine.stop(uuid)
            assert (engine.get(uuid).vm_state, engine.get(uuid).power_state) == (VmState.STOPPED, PowerState.SHUTDOWN)
            engine.delete(uuid)
            assert _disk_volumes(engine.hosts.driver("q1")) == set()
            assert uuid not in engine.hosts.driver("q1").list_instances().owned
    finally:
        remove_pools(HostStorage(str(tmp_path / "instances")))


@pytest.mark.qemu
@pytest.mark.slow
def test_resize_between_two_real_hosts(tmp_path: Path, base_image: Path, remote_instances: PurePosixPath) -> None:
    """On real QEMU: resize copies the disk to the other libvirtd, grown and backed by that host's own cache; confirm deletes the source's kept disk."""
    qemu_ready()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    remote_uri = os.environ["LIFECYCLE_TEST_REMOTE_URI"]
    try:
        with Engine(url, settings=Settings(libvirt_domain_type="qemu", shutdown_timeout=0)) as engine:
            engine.hosts.add("src", QEMU_URI, str(tmp_path / "src"))
            engine.hosts.add("dst", remote_uri, str(remote_instances), console_address="127.0.0.2")
            for name in ("src", "dst"):
                engine.hosts.heartbeat(name)
            engine.images.add("base", str(base_image))
            uuid = engine.create("mover", host="src", flavor=Flavor(1, 64, 1), image="base").instance_uuid
            engine.resize(uuid, Flavor(1, 128, 2))
            assert (engine.get(uuid).host, engine.get(uuid).status) == ("dst", "VERIFY_RESIZE")
            src, dst = engine.hosts.driver("src"), engine.hosts.driver("dst")
            assert isinstance(dst, LibvirtDriver)
            with dst._calling("test") as conn:
                copy = dst.storage.volume(conn, dst.storage.disks_pool, engine.get(uuid).disk)
                assert copy is not None and copy.info()[1] == 2 * 1024**3
                assert copy.XMLDesc(0).count(f"_base/{image_key(base_image)}") == 1  # backed by dst's own cache
            assert _disk_volumes(src) == {uuid}  # kept until the resize is confirmed
            engine.confirm_resize(uuid)
            assert _disk_volumes(src) == set()
            assert dst.get_info(uuid) is PowerState.RUNNING
            engine.delete(uuid)
            assert _disk_volumes(dst) == set()
    finally:
        remove_pools(HostStorage(str(tmp_path / "src")))


@pytest.mark.libvirt
def test_a_call_stuck_on_one_connection_does_not_hold_the_next_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every connection's call stuck (a hung guest's monitor) a ping gets a new connection, not a hung-host error."""
    import lifecycle.drivers.libvirt._connections as connections

    libvirt_ready()
    monkeypatch.setattr(connections, "STUCK_SECONDS", 0.5)
    driver = LibvirtDriver("test:///default", "/tmp/unused", connections=1)
    release = threading.Event()
    try:
        first = driver._conns.first
        assert first is not None
        stuck = threading.Thread(target=first.call, args=("stuck", release.wait, 30))
        stuck.start()
        wait_until("the call in flight counted as stuck", lambda: first.stuck_for() >= 0.6, 5)
        started = time.monotonic()
        driver.ping()
        assert time.monotonic() - started < 3.0
        links = [driver._conns.first, *driver._conns.spare]
        assert len(links) == 2, "a stuck connection does not count toward the limit"
    finally:
        release.set()
        driver.close()
