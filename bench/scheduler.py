"""Benchmark: one placement decision over 100, 1,000 and 10,000 hosts vs reading every host row once.

- read: what each decision paid before issue 17, reading every host row in
  one query and turning the rows into scheduler values;
- decision: what a create's scheduling step does now (filter, weigh, pick and
  claim, through :func:`lifecycle.placement.scheduler_for`): the filters the
  database can check run in the query, the rows come best first for the RAM
  weigher, and only a page of candidates is read and filtered in Python.

Target: at 10,000 hosts the median decision costs at most 0.2x the median
read, measured interleaved in the same run.

    python bench/scheduler.py [--repeat 15] [--sizes 100 1000 10000] [--pg-server URL]

On SQLite files by default; with ``--pg-server`` (a PostgreSQL URL whose
role may create databases) each size runs in a database of its own, created
and dropped by the script.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/transitions.py, which would shadow the `transitions`
# library the engine imports: take the folder off sys.path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import sqlalchemy as sa

from lifecycle import Flavor, Settings, upgrade
from lifecycle.placement import host_states, scheduler_for
from lifecycle.records import Image
from lifecycle.store import Store
from lifecycle.store.db import connect
from lifecycle.store.tables import HOSTS, IMAGES, INSTANCES

TARGET = 0.2
FLAVOR = Flavor(vcpus=4, memory_mb=8192, root_gb=40, extra_specs=(("capabilities:ssd", "true"),))


def populate(url: str, count: int, decisions: int) -> list[str]:
    """Insert ``count`` hosts, and one building instance per decision (a claim names its instance)."""
    rng = random.Random(count)
    at = datetime.now(UTC)
    rows = [
        {
            "name": f"compute-{i:05d}",
            "driver_uri": "fake://",
            "instances_path": "/x",
            "enabled": rng.random() > 0.02,
            "created_at": at,
            "availability_zone": f"az{i % 3}",
            "vcpus": 32,
            "memory_mb": 131072,
            "disk_gb": 2000,
            "vcpus_used": rng.randint(0, 400),
            "memory_mb_used": rng.randint(0, 190000),
            "disk_gb_used": rng.randint(0, 1900),
            "capabilities": json.dumps({"ssd": rng.choice(["true", "false"])}),
            "hypervisor_type": "qemu",
            "architecture": "x86_64",
            "metrics": "{}",
            "last_heartbeat": at,
        }
        for i in range(count)
    ]
    uuids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(decisions)]
    instances = [
        {
            "uuid": u,
            "name": f"vm{i}",
            "host": None,
            "flavor_name": "bench",
            "vcpus": FLAVOR.vcpus,
            "memory_mb": FLAVOR.memory_mb,
            "root_gb": FLAVOR.root_gb,
            "image": "cirros",
            "vm_state": "building",
            "task_state": "scheduling",
            "power_state": 0,
            "version": 1,
            "created_at": at,
            "updated_at": at,
            "missing_count": 0,
        }
        for i, u in enumerate(uuids)
    ]
    db = connect(url)
    with db.begin() as conn:
        conn.execute(sa.insert(HOSTS), rows)
        image = {"name": "cirros", "path": "/i", "disk_format": "qcow2", "min_disk_gb": 0, "created_at": at}
        conn.execute(sa.insert(IMAGES), image)
        conn.execute(sa.insert(INSTANCES), instances)
    db.dispose()
    return uuids


def measure(url: str, count: int, repeat: int) -> tuple[float, float]:
    """Return the median read of every host row and the median decision, interleaved in one run."""
    uuids = populate(url, count, repeat)
    settings = Settings()
    image = Image("cirros", "/i", "qcow2", 0, datetime.now(UTC))
    store = Store(url)
    reads, decisions = [], []
    try:
        for uuid in uuids:
            gc.collect()  # neither side pays for the garbage of the one before
            started = time.perf_counter()
            host_states(store.hosts.list(), settings.host_down_after, now=store.clock.now())
            reads.append(time.perf_counter() - started)
            schedule = scheduler_for(store, settings, uuid, FLAVOR, image, requested_host=None, availability_zone="az1")
            gc.collect()
            started = time.perf_counter()
            schedule([])
            decisions.append(time.perf_counter() - started)
    finally:
        store.close()
    return statistics.median(reads), statistics.median(decisions)


@contextlib.contextmanager
def database(scratch: Path, count: int, pg_server: str | None) -> Iterator[str]:
    """Yield the URL of an empty database for one size: a SQLite file, or a PostgreSQL database dropped after."""
    if pg_server is None:
        yield f"sqlite:///{scratch / f'{count}.db'}"
        return
    name = f"lifecycle_bench_sched_{count}_{os.getpid()}"
    server = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="decisions per size (median reported)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000], help="host counts")
    parser.add_argument("--pg-server", help="run on PostgreSQL: a server URL whose role may create databases")
    args = parser.parse_args()
    print(
        f"one placement decision (filter + weigh + pick + claim) vs reading every host row once, "
        f"medians of {args.repeat}; az1, 4 vcpus, 8 GiB, 40 GiB, capabilities:ssd true; "
        f"{'PostgreSQL' if args.pg_server else 'SQLite'}"
    )
    with tempfile.TemporaryDirectory(prefix="lifecycle-bench-sched-") as scratch:
        for count in args.sizes:
            with database(Path(scratch), count, args.pg_server) as url:
                upgrade(url)
                read, decision = measure(url, count, args.repeat)
            ratio = decision / read
            verdict = ("met" if ratio <= TARGET else "NOT met") if count >= 10_000 else "judged at 10000 hosts"
            print(
                f"{count:>6} hosts: read all {read * 1000:8.2f} ms, decision {decision * 1000:7.2f} ms, "
                f"ratio decision/read {ratio:5.3f} (target <= {TARGET:g}: {verdict})"
            )


if __name__ == "__main__":
    main()
