"""Benchmark: stop/start cycles through the engine vs the same SQL issued directly.

Both sides run on a SQLite file (WAL, synchronous=NORMAL) in the same process
and the same run, alternating rounds so machine noise hits both alike. The
raw side issues, per operation, exactly the statements the engine issues:
read the instance; one transaction inserting the task, compare-and-swapping
the instance, opening the step and writing the audit row; one transaction
compare-and-swapping the end state, closing the step, closing the task and
writing the audit row; and reading the finished task back.

    python bench/transitions.py [--cycles 200] [--rounds 7]

Prints the median time per operation on each side and the ratio (target <= 1.3).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `transitions` library the engine imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import logging
import statistics
import tempfile
import time
import uuid as uuidlib
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
import structlog

from lifecycle import Engine, Flavor, Settings, upgrade
from lifecycle.drivers.fake import FakeDriver
from lifecycle.store.db import connect
from lifecycle.store.tables import AUDITS, INSTANCES, STEPS, TASKS

I = INSTANCES
T = TASKS
S = STEPS
A = AUDITS


def engine_side(url: str, cycles: int) -> float:
    fake = FakeDriver("h1")
    with Engine(url, driver_factory=lambda _h: fake, settings=Settings(shutdown_timeout=0)) as engine:
        engine.hosts.add("h1", "fake://")
        image = Path(tempfile.gettempdir()) / "lifecycle-bench-cirros.qcow2"
        image.touch()  # the fake host never reads it; the engine wants a real file
        engine.images.add("cirros", str(image))
        uuid = engine.create("bench", host="h1", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
        started = time.perf_counter()
        for _ in range(cycles):
            engine.stop(uuid)
            engine.start(uuid)
        return (time.perf_counter() - started) / (2 * cycles)


def raw_side(url: str, cycles: int) -> float:
    db = connect(url)
    now = datetime.now(UTC)
    uuid = str(uuidlib.uuid4())
    with db.begin() as conn:
        conn.execute(
            sa.insert(
                sa.table(
                    "hosts",
                    sa.column("name"),
                    sa.column("driver_uri"),
                    sa.column("instances_path"),
                    sa.column("enabled"),
                    sa.column("created_at"),
                )
            ),
            {"name": "h1", "driver_uri": "fake://", "instances_path": "/x", "enabled": True, "created_at": now},
        )
        conn.execute(
            sa.insert(
                sa.table(
                    "images",
                    sa.column("name"),
                    sa.column("path"),
                    sa.column("disk_format"),
                    sa.column("min_disk_gb"),
                    sa.column("created_at"),
                )
            ),
            {"name": "cirros", "path": "/i", "disk_format": "qcow2", "min_disk_gb": 0, "created_at": now},
        )
        conn.execute(
            sa.insert(I),
            {
                "uuid": uuid,
                "name": "bench",
                "host": "h1",
                "flavor_name": "custom",
                "vcpus": 1,
                "memory_mb": 64,
                "root_gb": 1,
                "image": "cirros",
                "vm_state": "active",
                "task_state": None,
                "power_state": 1,
                "task_id": None,
                "previous_vm_state": None,
                "version": 1,
                "created_at": now,
                "updated_at": now,
            },
        )
    version = [1]
    ops = (("stop", "active", "powering-off", "stopped", 1, 4), ("start", "stopped", "powering-on", "active", 4, 1))
    started = time.perf_counter()
    for _ in range(cycles):
        for op, vm_from, task_state, vm_to, p_from, p_to in ops:
            _raw_operation(db, uuid, version, op, vm_from, task_state, vm_to, p_from, p_to)
    elapsed = time.perf_counter() - started
    db.dispose()
    return elapsed / (2 * cycles)


def _raw_operation(
    db: sa.Engine,
    uuid: str,
    version: list[int],
    op: str,
    vm_from: str,
    task_state: str,
    vm_to: str,
    p_from: int,
    p_to: int,
) -> None:
    at = datetime.now(UTC)
    task_id = str(uuidlib.uuid4())
    with db.connect().execution_options(readonly=True) as conn:
        conn.execute(sa.select(I).where(I.c.uuid == uuid)).mappings().first()
    audit = {
        "instance_uuid": uuid,
        "task_id": task_id,
        "request_id": "req",
        "actor": "api",
        "cause": "api",
        "operation": op,
        "rule": None,
        "message": None,
        "created_at": at,
    }
    with db.begin() as conn:
        conn.execute(
            sa.insert(T),
            {
                "id": task_id,
                "instance_uuid": uuid,
                "operation": op,
                "request_id": "req",
                "idempotency_key": None,
                "actor": "api",
                "cause": "api",
                "params": "{}",
                "outcome": "running",
                "preempted_by": None,
                "owner": "raw",
                "lease_expires_at": at + timedelta(seconds=60),
                "started_at": at,
                "finished_at": None,
                "error": None,
                "traceback": None,
            },
        )
        _raw_cas(
            conn, uuid, version, vm_from, None, None, {"task_state": task_state, "task_id": task_id, "updated_at": at}
        )
        conn.execute(sa.insert(S), {"task_id": task_id, "seq": 1, "name": task_state, "started_at": at})
        conn.execute(
            sa.insert(A),
            {
                **audit,
                "from_vm_state": vm_from,
                "to_vm_state": vm_from,
                "from_task_state": None,
                "to_task_state": task_state,
                "from_power_state": p_from,
                "to_power_state": p_from,
            },
        )
    at = datetime.now(UTC)
    with db.begin() as conn:
        _raw_cas(
            conn,
            uuid,
            version,
            vm_from,
            task_state,
            task_id,
            {"vm_state": vm_to, "task_state": None, "task_id": None, "power_state": p_to, "updated_at": at},
        )
        conn.execute(
            sa.update(S)
            .where(S.c.task_id == task_id, S.c.finished_at.is_(None))
            .values(finished_at=at, result="ok", detail=None)
        )
        conn.execute(
            sa.update(T)
            .where(T.c.id == task_id)
            .values(outcome="succeeded", finished_at=at, error=None, traceback=None)
        )
        conn.execute(
            sa.insert(A),
            {
                **audit,
                "created_at": at,
                "from_vm_state": vm_from,
                "to_vm_state": vm_to,
                "from_task_state": task_state,
                "to_task_state": None,
                "from_power_state": p_from,
                "to_power_state": p_to,
            },
        )
    with db.connect().execution_options(readonly=True) as conn:
        conn.execute(sa.select(T).where(T.c.id == task_id)).mappings().first()


def _raw_cas(
    conn: sa.Connection,
    uuid: str,
    version: list[int],
    vm_state: str,
    task_state: str | None,
    task_id: str | None,
    values: dict[str, object],
) -> None:
    query = (
        sa.update(I)
        .where(
            I.c.uuid == uuid,
            I.c.version == version[0],
            I.c.vm_state == vm_state,
            I.c.task_state.is_not_distinct_from(task_state),
            I.c.task_id.is_not_distinct_from(task_id),
        )
        .values(version=version[0] + 1, **values)
    )
    assert conn.execute(query).rowcount == 1
    version[0] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="stop/start cycles per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per side (median is reported)")
    args = parser.parse_args()
    # An embedding application decides logging; a quiet one is the realistic baseline.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    engine_times, raw_times = [], []
    with tempfile.TemporaryDirectory(prefix="lifecycle-bench-") as scratch:
        for round_no in range(args.rounds):
            for side, times in (("engine", engine_times), ("raw", raw_times)):
                url = f"sqlite:///{Path(scratch) / f'{side}-{round_no}.db'}"
                upgrade(url)
                fn = engine_side if side == "engine" else raw_side
                times.append(fn(url, args.cycles))
    engine_median, raw_median = statistics.median(engine_times), statistics.median(raw_times)
    ratio = engine_median / raw_median
    print(f"operations per side per round: {2 * args.cycles}, rounds: {args.rounds}")
    print(f"engine: median {engine_median * 1e6:8.1f} us/op  ({1 / engine_median:7.0f} ops/s)")
    print(f"raw:    median {raw_median * 1e6:8.1f} us/op  ({1 / raw_median:7.0f} ops/s)")
    print(f"ratio engine/raw: {ratio:.2f}  (target <= 1.30: {'met' if ratio <= 1.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
