"""Benchmark: one placement decision over 100, 1,000 and 10,000 hosts.

Each decision is what a create's scheduling step does: read every host in one
query, turn the rows into scheduler values, filter and weigh them, pick one.
No database round trip happens per host, so the cost should grow linearly:
the per-host figure stays roughly flat as the host count grows.

    python bench/scheduler.py [--repeat 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/transitions.py, which would shadow the `transitions`
# library the engine imports: take the folder off sys.path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime

import sqlalchemy as sa

from lifecycle import upgrade
from lifecycle.placement import host_states
from lifecycle.scheduler import Request, SchedulerSettings, select_host
from lifecycle.store import Store
from lifecycle.store.db import connect
from lifecycle.store.tables import HostRow

HOSTS: sa.Table = HostRow.__table__  # type: ignore[attr-defined]


def populate(url: str, count: int) -> None:
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
    db = connect(url)
    with db.begin() as conn:
        conn.execute(sa.insert(HOSTS), rows)
    db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="decisions per size (median reported)")
    args = parser.parse_args()
    request = Request(
        vcpus=4, memory_mb=8192, disk_gb=40, availability_zone="az1", extra_specs={"capabilities:ssd": "true"}
    )
    settings = SchedulerSettings()
    print(f"one placement decision (query + filter + weigh + pick), median of {args.repeat}")
    with tempfile.TemporaryDirectory(prefix="lifecycle-bench-sched-") as scratch:
        for count in (100, 1_000, 10_000):
            url = f"sqlite:///{Path(scratch) / f'{count}.db'}"
            upgrade(url)
            populate(url, count)
            store = Store(url)
            totals, pures = [], []
            for _ in range(args.repeat):
                started = time.perf_counter()
                states = host_states(store.list_hosts(), 60.0)
                pure_start = time.perf_counter()
                select_host(states, request, settings)
                done = time.perf_counter()
                totals.append(done - started)
                pures.append(done - pure_start)
            store.close()
            total, pure = statistics.median(totals), statistics.median(pures)
            print(
                f"{count:>6} hosts: {total * 1000:8.2f} ms total, {pure * 1000:7.2f} ms filter+weigh, "
                f"{total / count * 1e6:6.2f} us per host"
            )


if __name__ == "__main__":
    main()
