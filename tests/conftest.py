"""Shared fixtures: databases, engines over fake hosts, tier gating, invariant checks.

Tiers: tests marked ``postgres``, ``libvirt`` or ``qemu`` need a real part.
Without it they skip with a message saying how to enable them; with
``LIFECYCLE_CI=1`` (set by ``.ci/run``) a missing part fails the test instead.

``qemu:///system`` is one hypervisor shared by every qemu test, and by any
other pytest process on the machine; its domains and storage pools outlive a
test, a pytest process and even libvirtd (persistent definitions and QEMU
processes stay). A domain belongs to the test whose ``tmp_path`` holds its
disks, a pool to the test whose ``tmp_path`` holds its target folder: after
each qemu test the domains and pools it left are removed, pools with their
volumes (and a test that passed yet left a domain fails), and at the first
qemu test those of pytest sessions that are gone are removed.

A second host (``remote_host``: ``scripts/second-host.sh``, started by
``scripts/test.sh``) is another libvirtd reached only through libvirt at
``LIFECYCLE_TEST_REMOTE_URI``; its instances path exists on that host alone.
Each test using it takes a folder of its own under that path
(``remote_instances``); afterwards the domains whose disks are there, the
pools there with their volumes, and the folder itself are removed through
libvirt (and a test that passed yet left a domain fails).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from lifecycle import Engine, Flavor, Settings, upgrade
from lifecycle.clock import Clock, ManualClock
from lifecycle.drivers.base import Driver
from lifecycle.drivers.fake import FakeDriver
from lifecycle.logs import LogEvent
from lifecycle.records import Host
from tests.images import fake_image
from tests.invariants import check_invariants

PG_ENV = "LIFECYCLE_TEST_PG_URL"
QEMU_URI = os.environ.get("LIFECYCLE_TEST_QEMU_URI", "qemu:///system")
CI = os.environ.get("LIFECYCLE_CI") == "1"
REMOTE_URI_ENV = "LIFECYCLE_TEST_REMOTE_URI"
REMOTE_INSTANCES_ENV = "LIFECYCLE_TEST_REMOTE_INSTANCES"
REMOTE_PIDFILE_ENV = "LIFECYCLE_TEST_REMOTE_PIDFILE"
WAIT = 10.0
"""How long :func:`wait_until` waits unless told: ample for what another thread or a local process does."""

T = TypeVar("T")


def wait_until(what: str, predicate: Callable[[], T], timeout: float = WAIT, *, interval: float = 0.05) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something truthy, and return that.

    The one place a test lets wall time pass: it waits for what another
    thread or process makes observable, never for a fixed time. After
    ``timeout`` s it fails naming ``what`` and the last value seen; an
    exception from ``predicate`` (an assertion that the process still runs)
    ends the wait at once.
    """
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what} (last seen: {value!r})")
        time.sleep(interval)
    return value


def holds_for(what: str, predicate: Callable[[], object], seconds: float, *, interval: float = 0.05) -> None:
    """Check ``predicate`` every ``interval`` s for ``seconds`` s: fail naming ``what`` the first time it is falsy.

    For what must *not* happen meanwhile (a third build starting while two
    hold the slots), and for a stall the test keeps up on purpose (a
    hypervisor SIGSTOPped for 30 s) while it samples what the others do.
    """
    __tracebackhide__ = True
    ends = time.monotonic() + seconds

    def broken_or_over() -> tuple[bool, object] | None:
        value = predicate()
        if not value:
            return False, value
        return (True, value) if time.monotonic() >= ends else None

    held, value = wait_until(f"{what} (for {seconds:g} s)", broken_or_over, seconds + WAIT, interval=interval)
    assert held, f"{what} stopped holding within {seconds:g} s (last seen: {value!r})"


def require(part: str, available: bool, how: str) -> None:
    """Skip (fail in CI) when a real part a test needs is missing."""
    if available:
        return
    message = f"{part} not available: {how}"
    if CI:
        pytest.fail(f"LIFECYCLE_CI=1 makes this tier mandatory; {message}")
    pytest.skip(message)


def libvirt_ready() -> None:
    """Require libvirt-python and qemu-img (the libvirt tier)."""
    from lifecycle.drivers.libvirt import libvirt_available

    require("libvirt-python", libvirt_available(), "pip install 'lifecycle[libvirt]' (needs libvirt-dev, pkg-config)")
    require("qemu-img", shutil.which("qemu-img") is not None, "apt-get install qemu-utils")


def qemu_ready() -> None:
    """Require a libvirtd with QEMU answering on QEMU_URI (the qemu tier)."""
    libvirt_ready()
    import libvirt

    try:
        libvirt.open(QEMU_URI).close()
        answered = True
    except libvirt.libvirtError:
        answered = False
    require("libvirtd with QEMU", answered, f"start libvirtd (`make test` does) so that {QEMU_URI} answers")


def remote_ready() -> None:
    """Require a second libvirtd answering on LIFECYCLE_TEST_REMOTE_URI (the qemu tier's second host)."""
    libvirt_ready()
    import libvirt

    uri = os.environ.get(REMOTE_URI_ENV, "")
    how = (
        f"`make test` starts one; by hand, `scripts/second-host.sh start DIR` as root and set "
        f"{REMOTE_URI_ENV}, {REMOTE_INSTANCES_ENV} and {REMOTE_PIDFILE_ENV} as scripts/test.sh does"
    )
    require(
        "a second libvirt host",
        all(os.environ.get(name) for name in (REMOTE_URI_ENV, REMOTE_INSTANCES_ENV, REMOTE_PIDFILE_ENV)),
        how,
    )
    try:
        libvirt.open(uri).close()
        answered = True
    except libvirt.libvirtError:
        answered = False
    require("a second libvirt host", answered, f"{uri} does not answer; {how}")


def _disk_paths(conn: Any, root: ET.Element) -> list[Path]:
    """The paths of a domain's disks: file and block sources, and pool volumes (resolved through their pool)."""
    import libvirt

    paths = []
    for source in root.iterfind("devices/disk/source"):
        if path := source.get("file") or source.get("dev"):
            paths.append(Path(path))
        elif (pool_name := source.get("pool")) and (volume := source.get("volume")):
            with suppress(libvirt.libvirtError):  # a pool gone or undefined claims nothing
                pool = conn.storagePoolLookupByName(pool_name)
                try:
                    paths.append(Path(pool.storageVolLookupByName(volume).path()))
                except libvirt.libvirtError:  # an inactive pool: its volumes are files in its folder
                    target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                    if target:
                        paths.append(Path(target) / volume)
    return paths


def remove_qemu_domains(
    owned: Callable[[list[Path]], bool], uri: str = QEMU_URI, prefix: str = "lifecycle-"
) -> list[str]:
    """Destroy and undefine each domain on ``uri`` named ``prefix``* whose disk paths ``owned`` claims.

    Returns the names (and titles) of those found; nothing when libvirtd does not answer.
    """
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return []
    found = []
    try:
        for dom in conn.listAllDomains():
            try:
                root = ET.fromstring(dom.XMLDesc(0))
                disks = _disk_paths(conn, root)
                if not dom.name().startswith(prefix) or not disks or not owned(disks):
                    continue
                found.append(f"{root.findtext('name')} ({root.findtext('title')!r})")
                persistent = dom.isPersistent()
                with suppress(libvirt.libvirtError):  # already off
                    dom.destroy()
                if persistent:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # gone meanwhile is fine
                    raise
    finally:
        conn.close()
    return found


def _empty_and_remove(pool: Any) -> None:
    """Delete a storage pool's volumes, stop it, remove its folder (when empty) and undefine it.

    Each step tolerates what another clean-up (of another pytest process) or a folder already
    deleted can leave: a pool already stopped or started, a volume gone, a folder gone.
    """
    import libvirt

    with suppress(libvirt.libvirtError):  # started meanwhile, or its folder is gone
        if not pool.isActive():
            pool.create(0)
    volumes = []
    with suppress(libvirt.libvirtError):  # not active: a refresh that fails (folder gone) also stops it
        pool.refresh(0)
        volumes = pool.listAllVolumes(0)
    for vol in volumes:
        with suppress(libvirt.libvirtError):  # gone meanwhile, or a folder not empty
            vol.delete(0)
    with suppress(libvirt.libvirtError):  # not active
        pool.destroy()
    with suppress(libvirt.libvirtError):  # the folder is gone, or not empty
        pool.delete(0)
    if pool.isPersistent():  # a transient pool is gone once stopped
        pool.undefine()


def remove_qemu_pools(owned: Callable[[list[Path]], bool], uri: str = QEMU_URI) -> list[str]:
    """Remove each storage pool on ``uri`` whose target folder ``owned`` claims, with its volumes.

    Returns the names of those found; nothing when libvirtd does not answer.
    """
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return []
    found = []
    try:
        for pool in conn.listAllStoragePools(0):
            try:
                target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                if not target or not owned([Path(target)]):
                    continue
                found.append(pool.name())
                _empty_and_remove(pool)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:  # gone meanwhile is fine
                    raise
    finally:
        conn.close()
    return found


def _remove_remote_folder(uri: str, folder: PurePath, depth: int = 8) -> None:
    """Delete ``folder`` on the host at ``uri`` with what it holds, through a pool made for the purpose.

    The folder may exist on that host alone, so libvirt is the only way in; nothing is done
    when that libvirtd does not answer.
    """
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return
    try:
        xml = (
            f"<pool type='dir'><name>pytest-sweep-{uuid.uuid4().hex[:12]}</name>"
            f"<target><path>{folder}</path></target></pool>"
        )
        pool = conn.storagePoolDefineXML(xml, 0)
        try:
            try:
                pool.create(0)
            except libvirt.libvirtError:  # no such folder
                return
            for vol in pool.listAllVolumes(0):
                if vol.info()[0] == libvirt.VIR_STORAGE_VOL_DIR and depth > 0:
                    _remove_remote_folder(uri, PurePosixPath(vol.path()), depth - 1)
                else:
                    with suppress(libvirt.libvirtError):
                        vol.delete(0)
            pool.destroy()
            with suppress(libvirt.libvirtError):  # something in it was not a volume
                pool.delete(0)
        finally:
            with suppress(libvirt.libvirtError):
                pool.destroy()
            pool.undefine()
    finally:
        conn.close()


def remove_remote_leftovers(uri: str, folder: PurePath) -> list[str]:
    """Remove from the host at ``uri`` what lives in ``folder``: domains, pools with their volumes, the folder.

    Returns the names of the domains and pools found.
    """
    owned = _under(folder)
    found = remove_qemu_domains(owned, uri=uri, prefix="")
    found += [f"pool {name}" for name in remove_qemu_pools(owned, uri=uri)]
    _remove_remote_folder(uri, folder)
    return found


def _under(root: PurePath) -> Callable[[list[Path]], bool]:
    return lambda disks: any(disk.is_relative_to(root) for disk in disks)


def _session_gone(temproot: Path) -> Callable[[list[Path]], bool]:
    """Claim disks in a numbered pytest directory whose session has ended, or was killed.

    pytest keeps a ``.lock`` holding its pid in its numbered directory while
    the session runs and removes it at exit; a directory without one, or whose
    pid is dead, or that pytest already deleted, belongs to no live session.
    """

    def gone(disks: list[Path]) -> bool:
        for disk in disks:
            if not disk.is_relative_to(temproot) or len(disk.relative_to(temproot).parts) < 2:
                continue
            numbered = temproot / disk.relative_to(temproot).parts[0]
            if not re.fullmatch(r"pytest-\d+", numbered.name):
                continue
            try:
                pid = int((numbered / ".lock").read_text())
            except (OSError, ValueError):
                return True
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass  # alive, another user's
        return False

    return gone


_STALE_REMOVED = pytest.StashKey[list[str]]()
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def stale_qemu_domains_removed(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> None:
    """Once per session: remove domains and pools left on QEMU_URI by pytest sessions that have ended or were killed."""
    basetemp = tmp_path_factory.getbasetemp()
    if not re.fullmatch(r"pytest-\d+", basetemp.name):  # --basetemp: no numbered siblings to judge
        return
    gone = _session_gone(basetemp.parent)
    removed = remove_qemu_domains(gone)
    removed += [f"pool {name}" for name in remove_qemu_pools(gone)]
    pytestconfig.stash[_STALE_REMOVED] = removed


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Say which domains and pools of ended pytest sessions were removed from QEMU_URI, if any."""
    if removed := config.stash.get(_STALE_REMOVED, []):
        terminalreporter.write_line(
            f"removed domains and pools of ended pytest sessions from {QEMU_URI}: {', '.join(removed)}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Note on the item whether its test body failed (read by the qemu clean-up below)."""
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_CALL_FAILED] = True
    return report


@pytest.fixture(autouse=True)
def qemu_domains_removed(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a qemu test, remove the domains and pools in its tmp_path; a passing test must leave no domain."""
    from lifecycle.drivers.libvirt import libvirt_available

    if request.node.get_closest_marker("qemu") is None or not libvirt_available():
        yield
        return
    request.getfixturevalue("stale_qemu_domains_removed")
    tmp_path: Path = request.getfixturevalue("tmp_path")
    yield
    left = remove_qemu_domains(_under(tmp_path))
    remove_qemu_pools(_under(tmp_path))  # the engine's to keep: removed, not a fault
    if left and not request.node.stash.get(_CALL_FAILED, False):
        pytest.fail(f"the test passed but left domains on {QEMU_URI} (now removed): {', '.join(left)}")


@dataclass(frozen=True)
class RemoteHost:
    """The second libvirt host: its URI, its instances path (on that host only) and its libvirtd's pidfile."""

    uri: str
    instances_path: PurePosixPath
    pidfile: Path


@pytest.fixture
def remote_host() -> RemoteHost:
    """The second libvirt host that `scripts/test.sh` starts (``scripts/second-host.sh``)."""
    remote_ready()
    return RemoteHost(
        uri=os.environ[REMOTE_URI_ENV],
        instances_path=PurePosixPath(os.environ[REMOTE_INSTANCES_ENV]),
        pidfile=Path(os.environ[REMOTE_PIDFILE_ENV]),
    )


@pytest.fixture
def remote_instances(request: pytest.FixtureRequest, remote_host: RemoteHost) -> Iterator[PurePosixPath]:
    """A folder of this test's own under the second host's instances path (not created; on that host only).

    Afterwards the domains whose disks are in it, the pools in it with their volumes, and the folder
    are removed through libvirt; a passing test must leave no domain.
    """
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    folder = remote_host.instances_path / f"{name}-{uuid.uuid4().hex[:8]}"
    yield folder
    left = [f for f in remove_remote_leftovers(remote_host.uri, folder) if not f.startswith("pool ")]
    if left and not request.node.stash.get(_CALL_FAILED, False):
        pytest.fail(f"the test passed but left domains on {remote_host.uri} (now removed): {', '.join(left)}")


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    """A 64 MiB qcow2 base image made with qemu-img (no OS: SeaBIOS idles, the domain runs)."""
    require("qemu-img", shutil.which("qemu-img") is not None, "apt-get install qemu-utils")
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def private_node_uri(tmp_path: Path) -> str:
    """Return a test:/// URI for a private, empty libvirt test-driver host."""
    node = tmp_path / f"node-{uuid.uuid4().hex[:8]}.xml"
    node.write_text("<node/>")
    return f"test://{node}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite file database."""
    url = f"sqlite:///{tmp_path / 'lifecycle.db'}"
    upgrade(url)
    return url


@pytest.fixture
def pg_server_url() -> str:
    """The URL of the throwaway PostgreSQL database the test command started."""
    url = os.environ.get(PG_ENV, "")
    require("PostgreSQL", bool(url), f"set {PG_ENV} or run `make test`, which starts a throwaway server")
    return url


_PG_TEMPLATE = f"lifecycle_template_{os.getpid()}"
"""This test session's own template: sessions running side by side on one server never copy a half-made one."""
_template_ready: list[bool] = []


@contextmanager
def _scratch_pg(server_url: str, template: str | None = None) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    url = server_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database (created and dropped around the test)."""
    with _scratch_pg(pg_server_url) as url:
        yield url


def _migrated_template(server_url: str) -> str:
    """Create (once per session) a PostgreSQL database at head to copy per test: alembic is slow."""
    if not _template_ready:
        admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_PG_TEMPLATE} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {_PG_TEMPLATE}")
        admin.dispose()
        url = server_url.rsplit("/", 1)[0] + f"/{_PG_TEMPLATE}"
        upgrade(url)
        sa.create_engine(url).dispose()
        _template_ready.append(True)
        atexit.register(_drop_template, server_url)
    return _PG_TEMPLATE


def _drop_template(server_url: str) -> None:
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_PG_TEMPLATE} WITH (FORCE)")
    except sa.exc.OperationalError:  # the server stopped before this session ended: nothing left to drop
        pass
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database: a SQLite file, and (postgres tier) a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'lifecycle.db'}"
        upgrade(url)
        yield url
        return
    server = request.getfixturevalue("pg_server_url")
    with _scratch_pg(server, _migrated_template(server)) as url:
        yield url


class Fakes(dict[str, FakeDriver]):
    """Fake hypervisors by host name, created on first use (kept in the host's state file when its URI names one)."""

    def factory(self, host: Host) -> Driver:
        state = host.driver_uri.removeprefix("fake://") or None  # fake:///ABS/state.json: shared with subprocesses
        return self.setdefault(host.name, FakeDriver(host.name, state_path=state))


@pytest.fixture(autouse=True)
def engine_images_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images the engine makes (shelve snapshots) go under the test's own folder, never the home folder."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture
def fakes() -> Fakes:
    """The fake hosts of the engine under test."""
    return Fakes()


@pytest.fixture
def clock() -> ManualClock:
    """A clock that moves only when the test advances it: the test's ``engine`` and ``one_owner`` engines run on it."""
    return ManualClock()


def _test_clock(request: pytest.FixtureRequest) -> Clock | None:
    """The test's :func:`clock` when it asks for one, else None (the engine's real clock)."""
    return request.getfixturevalue("clock") if "clock" in request.fixturenames else None


@pytest.fixture
def one_owner(sqlite_url: str, fakes: Fakes, request: pytest.FixtureRequest) -> Callable[..., Engine]:
    """Open engines (with ``settings``) sharing one database, one owner name (a restarted process) and fake hosts."""
    test_clock = _test_clock(request)

    def open_engine(**settings: float) -> Engine:
        engine = Engine(
            sqlite_url,
            driver_factory=fakes.factory,
            owner="engine-a",
            settings=Settings(**{"shutdown_timeout": 0.0, **settings}),  # type: ignore[arg-type]
            clock=test_clock,
        )
        if not engine.hosts.list():
            for host in ("h1", "h2"):
                engine.hosts.add(host, "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
            engine.images.add("cirros", fake_image("cirros"))
        for host in ("h1", "h2"):
            engine.hosts.heartbeat(host)
        return engine

    return open_engine


def make_engine(url: str, fakes: Fakes, *, clock: Clock | None = None, **settings: float) -> Engine:
    """An engine over ``url`` (on ``clock``, else the real one) with hosts h1 and h2 (fake) and image cirros."""
    engine = Engine(url, driver_factory=fakes.factory, settings=Settings(**settings), clock=clock)  # type: ignore[arg-type]
    if not engine.hosts.list():
        engine.hosts.add("h1", "fake://")
        engine.hosts.add("h2", "fake://")
        engine.images.add("cirros", fake_image("cirros"))
    return engine


@pytest.fixture
def engine(db_url: str, fakes: Fakes, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An engine on SQLite (and PostgreSQL) over two fake hosts (on the test's :func:`clock` if it asks for one).

    Invariants are checked at teardown.
    """
    eng = make_engine(db_url, fakes, clock=_test_clock(request), shutdown_timeout=0.0)
    yield eng
    check_invariants(eng.store)
    eng.close()


FLAVOR = Flavor(vcpus=1, memory_mb=64, root_gb=1, name="tiny")


@pytest.fixture
def new_instance(engine: Engine) -> Callable[..., str]:
    """Create an active instance on h1 and return its uuid."""

    def make(name: str = "vm", host: str = "h1") -> str:
        return engine.create(name, host=host, flavor=FLAVOR, image="cirros").instance_uuid

    return make


class _Captured(logging.Handler):
    """Keep each record of the library's loggers as its event dict, with its level as ``log_level``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = dict(record.msg) if isinstance(record.msg, LogEvent) else {"event": record.getMessage()}
        self.events.append({**event, "log_level": record.levelname.lower()})


@contextmanager
def all_logs() -> Iterator[list[dict[str, Any]]]:
    """Capture every log event of the block, at every level, whatever level an earlier test (or a CLI run) set."""
    with library_logging_kept():
        handler = _Captured()
        logger = logging.getLogger("lifecycle")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        yield handler.events


@contextmanager
def library_logging_kept() -> Iterator[None]:
    """Put the ``lifecycle`` logger's handlers and levels back as they were (the CLI's ``main`` configures them)."""
    loggers = [logging.getLogger(name) for name in ("lifecycle", "lifecycle.console_proxy.websockets")]
    kept = [(logger, logger.level, list(logger.handlers)) for logger in loggers]
    try:
        yield
    finally:
        for logger, level, handlers in kept:
            logger.setLevel(level)
            logger.handlers[:] = handlers


@pytest.fixture(autouse=True)
def _library_logging_restored() -> Iterator[None]:
    """Undo what a test's in-process CLI run did to the library's logging, for the tests after it."""
    with library_logging_kept():
        yield
