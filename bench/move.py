"""Benchmark: a cold migrate between two libvirt hosts vs ``cp --sparse=always`` of the same disk, same run.

Setup per round: an engine on a scratch SQLite file with two real hosts, the
machine's libvirtd (``qemu:///system``) and a second one reached only over
TCP (``scripts/second-host.sh`` starts it: ``qemu+tcp://127.0.0.2/system``);
a stopped guest (so no shutdown wait counts) whose 4 GiB virtual root disk
holds ``--data-mib`` MiB written into its overlay with ``qemu-io``.

- migrate: ``engine.migrate`` from the call until the instance is
  ``resized``: the sparse stream from the source host into the destination
  host, the digest read back there, the domain defined;
- floor: ``cp --sparse=always`` of the same overlay file on this machine.

Targets: migrate time at most 2.5x the copy's; bytes streamed at most 1.1x the
data written. Medians over ``--runs`` rounds.

    python bench/move.py [--data-mib 512] [--runs 3] [--remote-uri URI] [--remote-instances PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/transitions.py, which would shadow the `transitions`
# library the engine imports: take the folder off sys.path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import logging
import os
import statistics
import subprocess
import tempfile
import time
import uuid as uuidlib

import structlog

from drivers.libvirt import LibvirtDriver
from lifecycle import Engine, Flavor, Settings, upgrade


def main() -> int:
    """Run the rounds and print the medians and ratios."""
    args = _parse()
    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    moves, copies, streamed = [], [], []
    for _ in range(args.runs):
        seconds, cp_seconds, sent = _round(args)
        moves.append(seconds)
        copies.append(cp_seconds)
        streamed.append(sent)
    data = args.data_mib * 2**20
    move, copy, sent = statistics.median(moves), statistics.median(copies), statistics.median(streamed)
    print(f"data written: {args.data_mib} MiB into a 4 GiB virtual disk; {args.runs} rounds, medians")
    print(f"migrate between hosts: {move:.3f} s   cp --sparse=always: {copy:.3f} s")
    print(f"ratio migrate/cp: {move / copy:.2f}x (target <= 2.5x)")
    print(f"bytes streamed: {sent / 2**20:.1f} MiB; ratio to data written: {sent / data:.3f}x (target <= 1.1x)")
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


def _round(args: argparse.Namespace) -> tuple[float, float, int]:
    """One instance: build stopped, write data into its overlay, time the migrate, then time cp of the overlay."""
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
            engine.add_host("local", args.local_uri, str(work / "instances"), vcpus=4, memory_mb=4096, disk_gb=50)
            engine.add_host("remote", args.remote_uri, remote_path, vcpus=4, memory_mb=4096, disk_gb=50)
            for host in ("local", "remote"):
                engine.heartbeat(host)
            engine.add_image("base", str(base))
            uuid = engine.create("bench", host="local", flavor=Flavor(1, 64, 4), image="base").instance_uuid
            try:
                engine.stop(uuid)
                overlay = work / "instances" / "disks" / str(engine.get(uuid).disk)
                pattern = f"write -P 0x5a 0 {args.data_mib}M"
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", pattern, str(overlay)], check=True, capture_output=True)
                started = time.perf_counter()
                engine.migrate(uuid, host="remote")
                seconds = time.perf_counter() - started
                assert engine.get(uuid).status == "VERIFY_RESIZE"
                sent = engine.migrations()[0].bytes_done or 0
                target = work / "cp-copy"
                started = time.perf_counter()
                subprocess.run(["cp", "--sparse=always", str(overlay), str(target)], check=True)
                cp_seconds = time.perf_counter() - started
            finally:
                engine.force_delete(uuid)
                for host in ("local", "remote"):
                    _drop_pools(engine, host)
        return seconds, cp_seconds, sent


def _drop_pools(engine: Engine, host: str) -> None:
    """Remove the pools this round's host made (their volumes first), so rounds leave nothing behind."""
    driver = engine.driver(host)
    assert isinstance(driver, LibvirtDriver)
    driver.drop_storage()


if __name__ == "__main__":
    sys.exit(main())
