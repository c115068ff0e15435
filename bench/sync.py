"""Benchmark: one sync pass over a big host vs Nova's per-instance loop and vs the raw floor, same data, same run.

Setup: a SQLite file (WAL) with N instances on one host, a fake driver
listing, both built fresh for every timed run from the same template.

- sweep: the engine's pass: one listing call, chunked reads, one decision per
  distinct case, power-only changes as one batched compare-and-swap (per
  chunk's worth of writes), stops run as tasks;
- nova loop: what Nova's _sync_power_states does: one query for the host's
  instances, then per instance a fresh read of its row, one driver call, the
  same decision, and one transaction per change (stops run as tasks too);
- floor: the least any pass can do, in raw SQLAlchemy Core: one listing call,
  one select of the columns a decision needs, and one transaction holding one
  batched compare-and-swap UPDATE of the drifted rows' power state and one
  batched INSERT of their audit rows (a stop is counted as a power write: no
  task, no driver call).

Scenarios: steady state (nothing drifted; target sweep >= 20x faster than the
loop) and 1% drifted (90% of the drifted power-only, 10% needing a stop;
target >= 5x); in both the sweep must cost at most 3x the floor (the median
of each run's sweep/floor ratio: a floor and a sweep run back to back share
the machine's noise).
Then peak traced memory of a steady pass at N and 10N instances (target:
growth < 64 MiB).

    python bench/sync.py [--instances 10000] [--runs 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/transitions.py, which would shadow the `transitions`
# library the engine imports: take the folder off sys.path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import gc
import logging
import shutil
import statistics
import tempfile
import time
import tracemalloc
import uuid as uuidlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
import structlog

from lifecycle import Engine, PowerState, Settings, upgrade
from lifecycle.audit import Why
from lifecycle.drivers.fake import FakeDriver, _Domain
from lifecycle.errors import DomainNotFound
from lifecycle.records import Cause
from lifecycle.store.db import connect
from lifecycle.store.tables import AUDITS, HOSTS, IMAGES, INSTANCES
from lifecycle.sweep import apply_decision, sweep_host
from lifecycle.sync import Action, Observation, Policy, Recorded, decide

TABLE = INSTANCES
FLOOR_TARGET = 3.0


def build_template(path: Path, count: int) -> list[str]:
    url = f"sqlite:///{path}"
    upgrade(url)
    past = datetime.now(UTC) - timedelta(hours=1)
    uuids = [str(uuidlib.UUID(int=i + 1)) for i in range(count)]
    db = connect(url)
    with db.begin() as conn:
        conn.execute(
            sa.insert(HOSTS),
            {"name": "h1", "driver_uri": "fake://", "instances_path": "/x", "enabled": True, "created_at": past},
        )
        conn.execute(
            sa.insert(IMAGES),
            {"name": "cirros", "path": "/i", "disk_format": "qcow2", "min_disk_gb": 0, "created_at": past},
        )
        rows = [
            {
                "uuid": u,
                "name": f"vm{i}",
                "host": "h1",
                "flavor_name": "tiny",
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
                "launched_at": past,
                "created_at": past,
                "updated_at": past,
                "deleted_at": None,
                "missing_count": 0,
            }
            for i, u in enumerate(uuids)
        ]
        for start in range(0, len(rows), 5000):
            conn.execute(sa.insert(TABLE), rows[start : start + 5000])
    db.dispose()
    return uuids


def make_fake(uuids: list[str], drift: dict[str, PowerState]) -> FakeDriver:
    fake = FakeDriver("h1")
    spec = {
        "uuid": "",
        "name": "vm",
        "vcpus": 1,
        "memory_mb": 64,
        "root_gb": 1,
        "image_path": "/i",
        "image_format": "qcow2",
    }
    for u in uuids:
        fake._domains[u] = _Domain(spec, int(drift.get(u, PowerState.RUNNING)), f"{u}/disk")
    return fake


def open_engine(template: Path, workdir: Path, fake: FakeDriver) -> Engine:
    path = workdir / f"run-{uuidlib.uuid4().hex[:8]}.db"
    shutil.copy(template, path)
    return Engine(f"sqlite:///{path}", driver_factory=lambda _h: fake, settings=Settings(shutdown_timeout=0))


def run_sweep(engine: Engine) -> None:
    sweep_host(engine.services, "h1", Policy(), chunk=1000)


def run_nova_loop(engine: Engine) -> None:
    driver = engine.hosts.driver("h1")
    why = Why(actor="sync", cause=Cause.SYNC, operation="sync")
    listed = [i.uuid for i in engine.store.instances.list("h1")]
    for uuid in listed:
        instance = engine.store.instances.get(uuid)
        try:
            power: PowerState | None = driver.get_info(uuid)
        except DomainNotFound:
            power = None
        recorded = Recorded(instance.vm_state, instance.task_state, instance.power_state, instance.updated_at)
        decision = decide(recorded, Observation(power, datetime.now(UTC)), Policy())
        if decision.action in (Action.UPDATE_POWER, Action.RECORD):
            engine.store.sync.set_power_many([(instance, decision.power, why)])  # type: ignore[list-item]
        elif decision.action in (Action.RUN, Action.MARK_ERROR):
            apply_decision(engine.services, instance, decision, Cause.SYNC, "sync")


def run_floor(engine: Engine) -> None:
    """One listing, one select of the decision's columns, one batched write of the drifted rows (raw Core)."""
    observed_at = datetime.now(UTC)
    owned = engine.hosts.driver("h1").list_instances().owned
    db, t = engine.store.engine, TABLE
    query = sa.select(t.c.uuid, t.c.version, t.c.task_state, t.c.power_state, t.c.updated_at > observed_at).where(
        t.c.host == "h1", t.c.vm_state != "deleted"
    )
    with db.connect() as conn:
        rows = conn.execute(query).all()
    at = datetime.now(UTC)
    drifted = [
        {"u": u, "v": v, "p": int(owned[u]), "old": p}
        for u, v, task, p, changed in rows
        if task is None and not changed and u in owned and int(owned[u]) != p
    ]
    if not drifted:
        return
    update = (
        sa.update(t)
        .where(t.c.uuid == sa.bindparam("u"), t.c.version == sa.bindparam("v"))
        .values(power_state=sa.bindparam("p"), version=sa.bindparam("v") + 1, updated_at=at)
    )
    audits = [
        {
            "instance_uuid": d["u"],
            "actor": "sync",
            "cause": "sync",
            "operation": "sync",
            "rule": "floor",
            "from_vm_state": "active",
            "to_vm_state": "active",
            "from_power_state": d["old"],
            "to_power_state": d["p"],
            "created_at": at,
            "host": "h1",
        }
        for d in drifted
    ]
    with db.begin() as conn:
        conn.execute(update, drifted)
        conn.execute(sa.insert(AUDITS), audits)


def timed(
    template: Path, workdir: Path, uuids: list[str], drift: dict[str, PowerState], fn: Callable[[Engine], None]
) -> float:
    engine = open_engine(template, workdir, make_fake(uuids, drift))
    gc.collect()  # no run pays for the garbage of the one before (it made the floor swing from 20 to 300 ms)
    try:
        started = time.perf_counter()
        fn(engine)
        return time.perf_counter() - started
    finally:
        engine.close()


def scenario(
    name: str, template: Path, workdir: Path, uuids: list[str], drift: dict[str, PowerState], runs: int, target: float
) -> None:
    sweeps, loops, floors = [], [], []
    for _ in range(runs):
        floors.append(timed(template, workdir, uuids, drift, run_floor))
        sweeps.append(timed(template, workdir, uuids, drift, run_sweep))
        loops.append(timed(template, workdir, uuids, drift, run_nova_loop))
    sweep, loop, floor = statistics.median(sweeps), statistics.median(loops), statistics.median(floors)
    ratio = loop / sweep
    over = statistics.median(s / f for s, f in zip(sweeps, floors, strict=True))  # each run's pair: same noise
    verdict = "met" if ratio >= target else "NOT met"
    floor_verdict = "met" if over <= FLOOR_TARGET else "NOT met"
    print(
        f"{name:<13} sweep {sweep * 1000:8.1f} ms  nova-loop {loop * 1000:8.1f} ms  "
        f"speed-up {ratio:5.1f}x  (target >= {target:.0f}x: {verdict})\n"
        f"{'':<13} floor {floor * 1000:8.1f} ms  ratio sweep/floor {over:5.2f}x (median of the runs' ratios)  "
        f"(target <= {FLOOR_TARGET:g}x: {floor_verdict})"
    )


def peak_memory(count: int, workdir: Path) -> float:
    template = workdir / f"mem-{count}.db"
    uuids = build_template(template, count)
    fake = make_fake(uuids, {})
    engine = open_engine(template, workdir, fake)
    try:
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        run_sweep(engine)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        engine.close()
    return (peak - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side (median reported)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="lifecycle-bench-sync-") as scratch:
        workdir = Path(scratch)
        template = workdir / "template.db"
        uuids = build_template(template, args.instances)
        drifted = uuids[::100]
        drift = {u: (PowerState.SHUTDOWN if i % 10 == 0 else PowerState.PAUSED) for i, u in enumerate(drifted)}
        print(
            f"{args.instances} instances on one host; {len(drift)} drifted in the second scenario "
            f"({sum(p is PowerState.SHUTDOWN for p in drift.values())} need a stop); medians of {args.runs}"
        )
        # A daemon is a long-lived process: import and build what the engine builds once before timing.
        timed(template, workdir, uuids, drift, run_sweep)
        scenario("steady state", template, workdir, uuids, {}, args.runs, 20)
        scenario("1% drifted", template, workdir, uuids, drift, args.runs, 5)
        if not args.skip_memory:
            small = peak_memory(args.instances, workdir)
            large = peak_memory(args.instances * 10, workdir)
            verdict = "met" if large - small < 64 else "NOT met"
            print(
                f"peak traced memory of a pass: {small:6.1f} MiB at {args.instances}, {large:6.1f} MiB at "
                f"{args.instances * 10}; growth {large - small:5.1f} MiB (target < 64 MiB: {verdict})"
            )


if __name__ == "__main__":
    main()
