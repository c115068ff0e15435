"""Benchmark: a cold migrate between two libvirt hosts vs one libvirt stream of the same disk, same run.

Setup per round: an engine on a scratch SQLite file with two real hosts, the
machine's libvirtd (``qemu:///system``) and a second one reached only over
TCP (``scripts/second-host.sh`` starts it: ``qemu+tcp://127.0.0.2/system``);
a stopped guest (so no shutdown wait counts) whose 4 GiB virtual root disk
holds ``--data-mib`` MiB written into its overlay with ``qemu-io``.

Before each of the three timings below the overlay file is written back and
dropped from the page cache (fsync, then ``posix_fadvise(DONTNEED)``; checked
with ``fincore`` when present): all three read it from the disk.

- migrate: ``engine.migrate`` from the call until the instance is
  ``resized``: the sparse stream from the source host into the destination
  host, the digest read back there, the domain defined;
- stream floor: what one libvirt stream does with the same bytes: the overlay
  file uploaded into a fresh volume of the destination host's disks pool as
  ``virsh vol-upload --sparse`` does it (``vol.upload`` with the sparse flag,
  ``stream.sparseSendAll``), the volume deleted afterwards;
- cp: ``cp --sparse=always`` of the overlay file on this machine.

Each round removes what it made on both hosts (instance, pools, volumes, the
remote folder), also when it fails.

While the migrate runs, the driver's calls and the stream helpers it uses are
wrapped from outside (the drivers are not edited) to say where its time goes:
the engine and its database, stopping the source, the copy (waiting for the
source's download, hashing what is sent, the progress records, the upload),
the digest read back, and the define.

Targets: migrate time at most 3x the stream floor's; bytes streamed at most
1.1x the data written. Medians over ``--runs`` rounds.

    python bench/move.py [--data-mib 512] [--runs 3] [--remote-uri URI] [--remote-instances PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/transitions.py, which would shadow the `transitions`
# library the engine imports: take the folder off sys.path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import errno
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import structlog

import lifecycle.drivers.libvirt._disks as libvirt_driver  # the disk calls look the stream helpers up there
from lifecycle import Engine, Flavor, Settings, upgrade
from lifecycle.drivers.base import Driver
from lifecycle.drivers.libvirt import LibvirtDriver
from lifecycle.drivers.storage import Content, HostStorage
from lifecycle.tasks import TaskRun

# The rows of the breakdown: (phase, label); a phase is measured, or derived in _phases().
BREAKDOWN = [
    ("engine", "engine and database (the migrate outside driver calls)"),
    ("other_calls", "other driver calls (leftover checks, power reads)"),
    ("source_off", "source: stop and undefine the domain"),
    ("copy", "copy: source download piped into destination upload"),
    ("copy.source_wait", "  of which waiting for the source's download"),
    ("copy.sha256", "  of which the checksum of what is sent"),
    ("copy.progress", "  of which progress records (database)"),
    ("copy.upload", "  of which sending to the destination (the rest)"),
    ("digest", "digest: the copy read back from the destination"),
    ("digest.sha256", "  of which the checksum of what is read back"),
    ("prepare", "destination: base, empty volume, grow"),
    ("define", "destination: adopt check and define"),
]


@dataclass(frozen=True, slots=True)
class Round:
    """One round's timings (seconds), the bytes the migrate streamed and where its time went."""

    migrate: float
    stream: float
    cp: float
    sent: int
    cached: int
    """The most bytes of the overlay found in the page cache right after an eviction (-1: not checked)."""
    phases: dict[str, float]


def main() -> int:
    """Run the rounds and print the medians and ratios."""
    args = _parse()
    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    rounds = [_round(args) for _ in range(args.runs)]
    _report(args, rounds)
    return 0


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--local-uri", default="qemu:///system")
    parser.add_argument(
        "--remote-uri", default=os.environ.get("LIFECYCLE_TEST_REMOTE_URI", "qemu+tcp://127.0.0.2/system")
    )
    parser.add_argument(
        "--remote-instances",
        default=os.environ.get("LIFECYCLE_TEST_REMOTE_INSTANCES", "/var/lib/libvirt/lifecycle"),
        help="a folder on the remote host; each round uses a fresh subfolder",
    )
    return parser.parse_args()


def _report(args: argparse.Namespace, rounds: list[Round]) -> None:
    def median(field: str) -> float:
        return statistics.median(getattr(r, field) for r in rounds)

    move, stream, copy, sent = median("migrate"), median("stream"), median("cp"), median("sent")
    data = args.data_mib * 2**20
    cached = max(r.cached for r in rounds)
    check = "not checked: no fincore" if cached < 0 else f"at most {cached / 2**20:.1f} MiB left cached (fincore)"
    print(f"data written: {args.data_mib} MiB into a 4 GiB virtual disk; {args.runs} rounds, medians")
    print(f"overlay evicted from the page cache before each timing: {check}")
    print(
        f"migrate between hosts: {move:.3f} s   one libvirt stream: {stream:.3f} s   cp --sparse=always: {copy:.3f} s"
    )
    print(f"ratio migrate/stream: {move / stream:.2f}x (target <= 3x)")
    print(f"ratio migrate/cp: {move / copy:.2f}x (cp from a cold page cache; for reference)")
    print(f"bytes streamed: {sent / 2**20:.1f} MiB; ratio to data written: {sent / data:.3f}x (target <= 1.1x)")
    print("where the migrate's time goes (medians, s):")
    for phase, label in BREAKDOWN:
        print(f"  {label:<56} {statistics.median(r.phases[phase] for r in rounds):7.3f}")


def _round(args: argparse.Namespace) -> Round:
    """One instance: build stopped, write data into its overlay, time the migrate, the stream and cp of it."""
    probe = _Probe()
    with tempfile.TemporaryDirectory(prefix="lifecycle-bench-move-") as scratch:
        work = Path(scratch)
        work.chmod(0o755)
        url = f"sqlite:///{work / 'bench.db'}"
        upgrade(url)
        base = work / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
        settings = Settings(libvirt_domain_type="qemu", shutdown_timeout=0)
        with Engine(url, settings=settings) as engine:
            remote_path = f"{args.remote_instances}/bench-{uuidlib.uuid4().hex[:8]}"
            engine.hosts.add("local", args.local_uri, str(work / "instances"), vcpus=4, memory_mb=4096, disk_gb=50)
            engine.hosts.add(
                "remote",
                args.remote_uri,
                remote_path,
                vcpus=4,
                memory_mb=4096,
                disk_gb=50,
                console_address=urlsplit(args.remote_uri).hostname,  # its guests' VNC servers listen there
            )
            for host in ("local", "remote"):
                engine.hosts.heartbeat(host)
            engine.images.add("base", str(base))
            uuid = engine.create("bench", host="local", flavor=Flavor(1, 64, 4), image="base").instance_uuid
            try:
                engine.stop(uuid)
                overlay = work / "instances" / "disks" / str(engine.get(uuid).disk)
                pattern = f"write -P 0x5a 0 {args.data_mib}M"
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", pattern, str(overlay)], check=True, capture_output=True)
                cached = [_evict(overlay)]
                with probe.watching():
                    started = time.perf_counter()
                    engine.migrate(uuid, host="remote")
                    seconds = time.perf_counter() - started
                assert engine.get(uuid).status == "VERIFY_RESIZE"
                sent = engine.migrations()[0].bytes_done or 0
                cached.append(_evict(overlay))
                stream_seconds = _stream_floor(args.remote_uri, HostStorage(remote_path).disks_pool, overlay)
                cached.append(_evict(overlay))
                cp_seconds = _cp_floor(overlay, work / "cp-copy")
            finally:
                _clean_up(engine, uuid, args.remote_uri, remote_path)
        return Round(seconds, stream_seconds, cp_seconds, sent, max(cached), _phases(probe.seconds, seconds))


def _clean_up(engine: Engine, uuid: str, remote_uri: str, remote_path: str) -> None:
    """Remove what the round made on both hosts; every step is tried, the first failure is raised after."""
    steps = [
        lambda: engine.force_delete(uuid),
        lambda: _drop_pools(engine, "local"),
        lambda: _drop_pools(engine, "remote"),
        lambda: _remove_folder(remote_uri, remote_path),
    ]
    failures = []
    for step in steps:
        try:
            step()
        except Exception as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


def _drop_pools(engine: Engine, host: str) -> None:
    """Remove the pools this round's host made (their volumes first), so rounds leave nothing behind."""
    driver = engine.hosts.driver(host)
    assert isinstance(driver, LibvirtDriver)
    driver.drop_storage()


def _remove_folder(uri: str, path: str) -> None:
    """Remove the round's folder on the remote host, empty once its pools are gone, through a pool made for it.

    The folder exists on that host alone: libvirt is the only way in.
    """
    import libvirt

    conn = libvirt.open(uri)
    try:
        name = f"bench-move-sweep-{uuidlib.uuid4().hex[:8]}"
        pool = conn.storagePoolDefineXML(
            f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>", 0
        )
        try:
            pool.delete(0)  # a dir pool's delete removes its (empty) folder
        finally:
            pool.undefine()
    finally:
        conn.close()


# -- the floors ----------------------------------------------------------------


def _evict(path: Path) -> int:
    """Write the file's dirty pages back and drop it from the page cache; return its bytes still cached (-1: unknown).

    ``posix_fadvise(DONTNEED)`` drops only clean pages, hence the fsync first;
    unlike ``drop_caches`` it leaves the rest of the machine's cache alone.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if shutil.which("fincore") is None:
        return -1
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True
    )
    return int(done.stdout.split()[0]) if done.returncode == 0 and done.stdout.strip() else -1


def _cp_floor(path: Path, target: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", str(path), str(target)], check=True)
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def _stream_floor(uri: str, pool_name: str, path: Path) -> float:
    """Upload ``path`` into a fresh volume of ``pool_name`` as one sparse stream, as virsh does; return its time.

    Timed from the stream's opening to its finish; the volume is deleted afterwards.
    """
    import libvirt

    conn = libvirt.open(uri)
    try:
        pool = conn.storagePoolLookupByName(pool_name)
        name = f"bench-stream-floor-{uuidlib.uuid4().hex[:8]}"
        vol = pool.createXML(
            f"<volume><name>{name}</name><capacity unit='bytes'>0</capacity>"
            "<target><format type='raw'/></target></volume>",
            0,
        )
        try:
            with path.open("rb") as handle:
                started = time.perf_counter()
                stream = conn.newStream(0)
                vol.upload(stream, 0, 0, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
                stream.sparseSendAll(_read, _section, _skip, handle.fileno())
                stream.finish()
                seconds = time.perf_counter() - started
            physical = vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2]
            assert physical == path.stat().st_size, f"the stream floor's copy holds {physical} bytes, not the file's"
        finally:
            vol.delete(0)
    finally:
        conn.close()
    return seconds


def _read(_stream: Any, nbytes: int, fd: int) -> bytes:
    return os.read(fd, nbytes)


def _section(_stream: Any, fd: int) -> tuple[bool, int]:
    """Return whether the file's offset is in data, and the length of that data or hole (as virsh's handler)."""
    pos, size = os.lseek(fd, 0, os.SEEK_CUR), os.fstat(fd).st_size
    if pos >= size:
        return True, 0
    try:
        data = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:  # ENXIO: only a hole remains
        if exc.errno != errno.ENXIO:
            raise
        data = size
    os.lseek(fd, pos, os.SEEK_SET)
    if data > pos:
        return False, data - pos
    end = os.lseek(fd, pos, os.SEEK_HOLE)
    os.lseek(fd, pos, os.SEEK_SET)
    return True, end - pos


def _skip(_stream: Any, length: int, fd: int) -> int:
    return os.lseek(fd, length, os.SEEK_CUR)


# -- where the migrate's time goes -----------------------------------------------


class _Probe:
    """Times the driver's parts of a migrate from outside, by wrapping (while watching) what the driver calls.

    Driver contract calls are summed only when made by the thread that runs
    the migrate and not from inside another driver call, so their sum is the
    migrate's time spent in drivers; the rest is the engine's.
    """

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self._thread = threading.get_ident()
        self._depth = 0
        self._stage = ""

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Wrap the driver's calls, stream helpers, hashing and progress records until the block ends."""
        contract = [n for n, v in vars(Driver).items() if callable(v) and not n.startswith("_")]
        patches = [(LibvirtDriver, name, self._call(name)) for name in contract]
        patches += [
            (LibvirtDriver, "_receive", self._timed("receive")),
            (libvirt_driver, "write_volume", self._timed("copy")),
            (libvirt_driver, "volume_digest", self._timed("digest")),
            (libvirt_driver, "read_volume", self._source),
            (Content, "add", self._timed_in_stage("sha256")),
            (TaskRun, "copy_progress", self._timed_in_stage("progress")),
        ]
        with ExitStack() as stack:
            for owner, name, wrap in patches:
                if hasattr(owner, name):  # a step the driver no longer takes (a digest read back) counts as 0 s
                    stack.enter_context(mock.patch.object(owner, name, wrap(getattr(owner, name))))
            yield

    def _call(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
            @wraps(method)
            def timed(*args: Any, **kwargs: Any) -> Any:
                outer = threading.get_ident() == self._thread and self._depth == 0
                if threading.get_ident() == self._thread:
                    self._depth += 1
                started = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    spent = time.perf_counter() - started
                    if threading.get_ident() == self._thread:
                        self._depth -= 1
                    self.seconds[f"call.{name}"] += spent
                    if outer:
                        self.seconds["calls"] += spent

            return timed

        return wrap

    def _timed(self, phase: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
            @wraps(function)
            def timed(*args: Any, **kwargs: Any) -> Any:
                before, self._stage = self._stage, phase
                started = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.seconds[phase] += time.perf_counter() - started
                    self._stage = before

            return timed

        return wrap

    def _timed_in_stage(self, part: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Time a helper called inside a stage (copy or digest), as that stage's ``part``."""

        def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
            @wraps(function)
            def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.seconds[f"{self._stage or 'other'}.{part}"] += time.perf_counter() - started

            return timed

        return wrap

    def _source(self, read_volume: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap the source's download so the time its reader waits for the next segment is counted."""

        @contextmanager
        def reading(*args: Any, **kwargs: Any) -> Iterator[Iterator[bytes | int]]:
            with read_volume(*args, **kwargs) as segments:
                yield self._waited(segments)

        return reading

    def _waited(self, segments: Iterator[bytes | int]) -> Iterator[bytes | int]:
        while True:
            started = time.perf_counter()
            segment = next(segments, None)
            self.seconds["copy.source_wait"] += time.perf_counter() - started
            if segment is None:
                return
            yield segment


def _phases(seconds: Counter[str], migrate: float) -> dict[str, float]:
    """Return the breakdown's rows from the probe's sums; the derived rows are differences of measured ones."""
    s = seconds
    finish = s["call.finish_migration"]
    phases = {phase: s[phase] for phase, _ in BREAKDOWN}
    phases["engine"] = migrate - s["calls"]
    phases["source_off"] = s["call.migrate_disk_and_power_off"]
    phases["other_calls"] = s["calls"] - finish - phases["source_off"]
    parts = s["copy.source_wait"] + s["copy.sha256"] + s["copy.progress"]
    phases["copy.upload"] = s["copy"] - parts
    phases["prepare"] = s["receive"] - s["copy"] - s["digest"]
    phases["define"] = finish - s["receive"]
    return phases


if __name__ == "__main__":
    sys.exit(main())
