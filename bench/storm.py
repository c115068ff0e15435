"""Benchmark: engine processes storming one PostgreSQL database, against a raw SQLAlchemy Core floor, same run.

P processes (default 4), one Engine each, share one database and H fake
hosts (default 100). Each process creates instances (the scheduler picks the
host and claims room on it), stops, starts and deletes them, until all of
them have issued N operations (default 2,000). Then P processes replay the
same operations as the floor: per operation, exactly as many transactions as
the engine committed for it (counted with SQLAlchemy ``commit`` events, per
operation, in each engine process), each one a compare-and-swap UPDATE of an
instance row plus its audit INSERT; the transaction of a create that got a
host also claims room on a host with a conditional UPDATE, the one of a
delete of a placed instance gives it back. Target: the engine at least 0.6x
the floor's operations per second.

Load: each process keeps a window of live instances (a fifth of its
operations); it creates until its window is full, then walks its oldest
instance through stop, start and delete before the next create. Hosts are
sized so that the peak demand (every process's window full, with the flavor
mix below) is ``--fill`` times what the hosts hold: by default 1.25, that is
room for 80% of the flavors asked at the peak (a host always holds at least
the largest flavor). So the hosts do fill up: a create then fails with
NoValidHost (counted, printed, and its error instance deleted) and its
process waits for room by walking its oldest instance to its delete first.
This is the regime where claims race: several processes see the same last
free room and all claim it. ``--fill 0.8`` runs the comfortable case
(peak at 80% of capacity).

The scheduler hands the claim a few candidate hosts, its pick first, and
one UPDATE claims the first that still fits (``lifecycle.placement``). A
claim race is a claim UPDATE that matched no row: every candidate filled up
meanwhile (or, in the first of PostgreSQL's two passes, was held by another
transaction), and the scheduler reads the hosts again and picks again (spawn
attempts are not used up). Each create with such an UPDATE counts as a
reschedule caused by racing claims (target: under 5% of creates), and the
report says how many of them then found no room left anywhere (NoValidHost:
they raced for the last room). Races the claim settled inside the database,
landing on a later candidate than the first choice without a re-read, are
counted beside them (from the engine's ``claim_took_later_candidate`` log
events). Reschedules after a failed spawn are read from the audit log (none
expected: the fake hosts do not fail).

What limits the engine shows in its per-operation counts, printed beside the
floor's for each kind: transactions, reads (connections used outside a
transaction), statements, pings of pooled connections (the dialect's ``do_ping``:
the engine pings only a connection in doubt, see ``lifecycle.store.db``) and
the round trips they add up to (statements, plus BEGIN and COMMIT or ROLLBACK
per transaction and per read outside autocommit, plus pings: a read in
autocommit sends neither), and the client CPU each side spent per operation;
a closing line puts the two ratios together.

Afterwards the database is checked: no host is over its allocation ratios
(vCPU, RAM, disk), and every instance's audit chain is consistent (each
row starts where the previous one ended, the last one ends at the instance
row's states: no lost update). A broken invariant exits 1; missing a target
only prints the verdict.

    python bench/storm.py --db postgresql+psycopg://postgres@127.0.0.1:55433/postgres \
        [--ops 2000] [--procs 4] [--hosts 100] [--fill 1.25] [--in-place]

``--db`` is a PostgreSQL server URL (default: $LIFECYCLE_TEST_PG_URL): a scratch
database is created on that server and dropped at the end; with
``--in-place`` the URL's own database is used (migrated to head first; it
must not hold the hosts of an earlier storm).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/transitions.py, which would shadow the `transitions`
# library the engine imports: take the folder off sys.path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import logging
import math
import multiprocessing
import os
import random
import tempfile
import threading
import time
import traceback
import uuid as uuidlib
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
import structlog

from lifecycle import Engine, Flavor, NoValidHost, Settings, TaskFailed, upgrade
from lifecycle.scheduler import SchedulerSettings
from lifecycle.store.tables import AUDITS, HOSTS, IMAGES, INSTANCES

I = INSTANCES
A = AUDITS
H = HOSTS
IMG = IMAGES

FLAVORS = (
    (Flavor(vcpus=1, memory_mb=1024, root_gb=10, name="small"), 0.6),
    (Flavor(vcpus=2, memory_mb=2048, root_gb=20, name="medium"), 0.3),
    (Flavor(vcpus=4, memory_mb=3072, root_gb=30, name="large"), 0.1),
)
KINDS = ("create", "create:novalidhost", "stop", "start", "delete")
SCHED = SchedulerSettings()
RATIOS = (SCHED.cpu_allocation_ratio, SCHED.ram_allocation_ratio, SCHED.disk_allocation_ratio)


class Op(NamedTuple):
    """One operation as a process issued it, timed and counted."""

    kind: str
    seconds: float
    commits: int
    rollbacks: int
    """Connections used outside a transaction (reads), each ended by a rollback."""
    free_reads: int
    """Those of them in autocommit: no BEGIN or ROLLBACK reaches the server."""
    statements: int
    pings: int
    lost_claims: int
    later_candidates: int
    """Claims settled in the database on a later candidate than the first choice (``claim_took_later_candidate``)."""
    placed: bool
    """A create that got a host, or a delete of an instance that had one: the floor claims or releases."""


class Result(NamedTuple):
    """What one process did: its operations in order and when it started and ended (wall clock)."""

    ops: list[Op]
    started: float
    ended: float
    cpu: float
    """CPU seconds the process spent between start and end (its Python side, not the server's)."""


def round_trips(op: Op) -> int:
    """Client-server round trips of an operation: its statements, BEGIN and COMMIT/ROLLBACK, and pings."""
    return op.statements + 2 * (op.commits + op.rollbacks - op.free_reads) + op.pings


# -- counting what the engine sends ------------------------------------------------------------------


@dataclass
class Counts:
    """Per-operation counters fed by SQLAlchemy events, for the calling thread only (not the lease heartbeat)."""

    thread: int = field(default_factory=threading.get_ident)
    commits: int = 0
    rollbacks: int = 0
    free_reads: int = 0
    statements: int = 0
    pings: int = 0
    lost_claims: int = 0
    later_candidates: int = 0

    def listen(self, db: sa.Engine) -> None:
        sa.event.listen(db, "commit", self._commit)
        sa.event.listen(db, "rollback", self._rollback)
        sa.event.listen(db, "after_cursor_execute", self._statement)
        ping = db.dialect.do_ping

        def counted(dbapi_conn: Any) -> bool:
            self.pings += self._mine()
            return bool(ping(dbapi_conn))

        db.dialect.do_ping = counted  # type: ignore[method-assign]

    def take(self) -> tuple[int, int, int, int, int, int, int]:
        taken = (
            self.commits,
            self.rollbacks,
            self.free_reads,
            self.statements,
            self.pings,
            self.lost_claims,
            self.later_candidates,
        )
        self.commits = self.rollbacks = self.free_reads = self.statements = self.pings = 0
        self.lost_claims = self.later_candidates = 0
        return taken

    def log_events(self) -> None:
        """Count the scheduler's ``claim_took_later_candidate`` events (info); print warnings and worse as before."""
        shown = structlog.get_config()["processors"]

        def count(_logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
            if self._mine() and event.get("event") == "claim_took_later_candidate":
                self.later_candidates += 1
            if method in ("debug", "info"):
                raise structlog.DropEvent
            return event

        structlog.configure(
            processors=[count, *shown], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
        )

    def _mine(self) -> bool:
        return threading.get_ident() == self.thread

    def _commit(self, *_a: Any) -> None:
        self.commits += self._mine()

    def _rollback(self, conn: sa.Connection) -> None:
        if self._mine():
            self.rollbacks += 1
            self.free_reads += bool(getattr(conn.connection.dbapi_connection, "autocommit", False))

    def _statement(self, _conn: Any, cursor: Any, statement: str, *_a: Any) -> None:
        if not self._mine():
            return
        self.statements += 1
        # The claim: UPDATE hosts ... SET vcpus_used=(hosts.vcpus_used + ...) WHERE ... fits.
        if statement.startswith("UPDATE hosts") and "vcpus_used + " in statement and cursor.rowcount == 0:
            self.lost_claims += 1


# -- the engine side ---------------------------------------------------------------------------------


def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def engine_worker(url: str, proc: int, budget: int, window: int, image: str, barrier: Any) -> Result:
    """Create, stop, start and delete instances until ``budget`` operations were issued."""
    _quiet()
    settings = Settings(shutdown_timeout=0, host_down_after=86_400.0)
    rng = random.Random(proc)
    with Engine(url, settings=settings, owner=f"storm-{proc}") as engine:
        counts = Counts()
        counts.listen(engine.store.engine)
        counts.log_events()
        live: deque[list[Any]] = deque()  # [uuid, next stage index, placed]
        ops: list[Op] = []
        waiting = False  # a create found no room: walk the oldest instance to its delete first
        barrier.wait()
        started, cpu = time.time(), time.process_time()
        while len(ops) < budget:
            if live and (len(live) >= window or waiting):
                entry = live[0]
                kind = ("stop", "start", "delete")[entry[1]]
                clock = time.perf_counter()
                engine.run(kind, entry[0])
                took = time.perf_counter() - clock
                entry[1] += 1
                if kind == "delete":
                    live.popleft()
                    waiting = waiting and not entry[2]  # room comes back once a placed instance is gone
                ops.append(Op(kind, took, *counts.take(), placed=kind == "delete" and entry[2]))
                continue
            flavor = rng.choices([f for f, _ in FLAVORS], [w for _, w in FLAVORS])[0]
            clock = time.perf_counter()
            try:
                task = engine.create(f"storm-{proc}-{len(ops)}", flavor=flavor, image=image)
                uuid, placed, kind = task.instance_uuid, True, "create"
            except TaskFailed as exc:
                if not isinstance(exc.__cause__, NoValidHost):
                    raise
                uuid, placed, kind = exc.task.instance_uuid, False, "create:novalidhost"
            took = time.perf_counter() - clock
            ops.append(Op(kind, took, *counts.take(), placed=placed))
            if placed:
                live.append([uuid, 0, True])
            elif len(ops) < budget:  # the error instance goes at once; then room is awaited
                live.appendleft([uuid, 2, False])
                waiting = True
        ended, cpu = time.time(), time.process_time() - cpu
        return Result(ops, started, ended, cpu)


# -- the floor ---------------------------------------------------------------------------------------


State = tuple[str, str | None, int]
"""vm_state, task_state, power_state."""


class FloorRow:
    """An instance row the floor compare-and-swaps, kept in memory as the engine keeps its Instance."""

    def __init__(self, uuid: str, flavor: Flavor) -> None:
        self.uuid, self.flavor = uuid, flavor
        self.version, self.vm, self.power = 1, "building", 0
        self.task: str | None = "scheduling"
        self.host: str | None = None

    def cas(self, conn: sa.Connection, vm: str, task: str | None, power: int) -> None:
        at = datetime.now(UTC)
        done = conn.execute(
            sa.update(I)
            .where(
                I.c.uuid == self.uuid,
                I.c.version == self.version,
                I.c.vm_state == self.vm,
                I.c.task_state.is_not_distinct_from(self.task),
                I.c.task_id.is_not_distinct_from(None),
            )
            .values(version=self.version + 1, vm_state=vm, task_state=task, power_state=power, updated_at=at)
        )
        assert done.rowcount == 1, f"floor lost its own row {self.uuid}"
        self.audit(conn, (self.vm, self.task, self.power), (vm, task, power), at)
        self.version, self.vm, self.task, self.power = self.version + 1, vm, task, power

    def audit(self, conn: sa.Connection, before: State | None, after: State, at: datetime) -> None:
        conn.execute(
            sa.insert(A),
            {
                "instance_uuid": self.uuid,
                "task_id": None,
                "request_id": "floor",
                "actor": "floor",
                "cause": "api",
                "operation": "floor",
                "rule": None,
                "from_vm_state": None if before is None else before[0],
                "to_vm_state": after[0],
                "from_task_state": None if before is None else before[1],
                "to_task_state": after[1],
                "from_power_state": None if before is None else before[2],
                "to_power_state": after[2],
                "message": None,
                "created_at": at,
                "host": self.host,
            },
        )


def _floor_walk(row: FloorRow, kind: str, steps: int) -> list[State]:
    """The (vm_state, task_state, power_state) each of ``steps`` transactions of an operation writes."""
    middle, end = {
        "create": ("spawning", ("active", None, 1)),
        "create:novalidhost": ("scheduling", ("error", None, 0)),
        "stop": ("powering-off", ("stopped", None, 4)),
        "start": ("powering-on", ("active", None, 1)),
        "delete": ("deleting", ("deleted", None, 0)),
    }[kind]
    return [(row.vm, middle, row.power)] * (steps - 1) + [end]


def _floor_create(conn: sa.Connection, row: FloorRow, image: str) -> None:
    at = datetime.now(UTC)
    values = {
        "uuid": row.uuid,
        "name": "floor",
        "host": None,
        "flavor_name": row.flavor.name,
        "vcpus": row.flavor.vcpus,
        "memory_mb": row.flavor.memory_mb,
        "root_gb": row.flavor.root_gb,
        "image": image,
        "vm_state": "building",
        "task_state": "scheduling",
        "power_state": 0,
        "version": 1,
        "created_at": at,
        "updated_at": at,
    }
    conn.execute(sa.insert(I), values)
    row.audit(conn, None, ("building", "scheduling", 0), at)


def _floor_claim(conn: sa.Connection, row: FloorRow, hosts: list[str], rng: random.Random, sign: int) -> None:
    f = row.flavor
    if sign > 0:
        row.host = rng.choice(hosts)
        fits = [
            sa.or_(total.is_(None), used + want <= total * ratio)
            for total, used, want, ratio in (
                (H.c.vcpus, H.c.vcpus_used, f.vcpus, RATIOS[0]),
                (H.c.memory_mb, H.c.memory_mb_used, f.memory_mb, RATIOS[1]),
                (H.c.disk_gb, H.c.disk_gb_used, f.root_gb, RATIOS[2]),
            )
        ]
    else:
        fits = []
    conn.execute(
        sa.update(H)
        .where(H.c.name == row.host, *fits)
        .values(
            vcpus_used=H.c.vcpus_used + sign * f.vcpus,
            memory_mb_used=H.c.memory_mb_used + sign * f.memory_mb,
            disk_gb_used=H.c.disk_gb_used + sign * f.root_gb,
        )
    )
    if sign > 0:
        conn.execute(sa.update(I).where(I.c.uuid == row.uuid).values(host=row.host))


def floor_worker(url: str, proc: int, script: list[Op], hosts: list[str], image: str, barrier: Any) -> Result:
    """Replay a process's operations as bare compare-and-swap-plus-audit transactions, as many per operation."""
    rng = random.Random(proc)
    db = sa.create_engine(url)
    counts = Counts()
    counts.listen(db)
    live: deque[FloorRow] = deque()
    timed: list[Op] = []
    barrier.wait()
    started, cpu = time.time(), time.process_time()
    for op in script:
        clock = time.perf_counter()
        if op.kind.startswith("create"):
            row = FloorRow(str(uuidlib.uuid4()), rng.choice([f for f, _ in FLAVORS]))
            with db.begin() as conn:
                _floor_create(conn, row, image)
            transactions = op.commits - 1
            # As the engine's process: a placed instance joins the window, a failed one is deleted next.
            live.append(row) if op.kind == "create" else live.appendleft(row)
        else:
            row = live.popleft() if op.kind == "delete" else live[0]
            transactions = op.commits
        for i, state in enumerate(_floor_walk(row, op.kind, max(transactions, 1))):
            with db.begin() as conn:
                if i == 0 and op.placed:
                    _floor_claim(conn, row, hosts, rng, +1 if op.kind == "create" else -1)
                row.cas(conn, *state)
        timed.append(Op(op.kind, time.perf_counter() - clock, *counts.take(), placed=op.placed))
    ended, cpu = time.time(), time.process_time() - cpu
    db.dispose()
    return Result(timed, started, ended, cpu)


# -- set-up, runs, checks, report --------------------------------------------------------------------


@contextmanager
def scratch_database(server_url: str, in_place: bool) -> Iterator[str]:
    """Yield a migrated database: a scratch one on the server (dropped afterwards), or the URL's own."""
    if in_place:
        upgrade(server_url)
        yield server_url
        return
    name = f"storm_{uuidlib.uuid4().hex[:10]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        url = sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@dataclass(frozen=True)
class Plan:
    """The load: operations per process, each process's window, and the hosts' size."""

    budgets: list[int]
    window: int
    host_memory_mb: int
    room: float
    """What the hosts hold, as a fraction of the peak demand (every window full)."""


def plan(ops: int, procs: int, hosts: int, fill: float) -> Plan:
    budgets = [ops // procs + (i < ops % procs) for i in range(procs)]
    window = max(2, ops // procs // 5)
    mean_mb = sum(f.memory_mb * w for f, w in FLAVORS)
    demand_mb = procs * window * mean_mb
    largest = max(f.memory_mb for f, _ in FLAVORS)
    usable = max(demand_mb / fill / hosts, largest)  # what the RAM ratio lets each host promise
    memory_mb = max(64, int(usable / RATIOS[1]) // 64 * 64)
    room = hosts * memory_mb * RATIOS[1] / demand_mb
    return Plan(budgets, window, memory_mb, room)


def prepare(url: str, hosts: int, memory_mb: int) -> str:
    """Register the engine's fake hosts (heartbeating, so the scheduler sees them up) and the image."""
    image_file = Path(tempfile.gettempdir()) / "lifecycle-bench-cirros.qcow2"
    image_file.touch()  # the fake hosts never read it; the engine wants a real file
    with Engine(url) as engine:
        for i in range(hosts):
            engine.hosts.add(f"storm-h{i:03d}", "fake://", vcpus=16, memory_mb=memory_mb, disk_gb=10_000)
            engine.hosts.heartbeat(f"storm-h{i:03d}")
        engine.images.add("cirros", str(image_file))
    return "cirros"


def prepare_floor(url: str, hosts: int, memory_mb: int) -> list[str]:
    """Add the floor's hosts, of the engine's hosts' size (after the engine's run: its scheduler never reads them)."""
    names = [f"floor-h{i:03d}" for i in range(hosts)]
    size = {"vcpus": 16, "memory_mb": memory_mb, "disk_gb": 10_000, "enabled": True, "created_at": datetime.now(UTC)}
    db = sa.create_engine(url)
    with db.begin() as conn:
        conn.execute(
            sa.insert(H), [{"name": n, "driver_uri": "fake://", "instances_path": "/x", **size} for n in names]
        )
    db.dispose()
    return names


def run_processes(target: Any, args: list[tuple[Any, ...]]) -> list[Result]:
    """Run ``target`` in one spawned process per argument tuple, released together by a barrier.

    A process that fails makes the run fail with its traceback instead of
    hanging: the barrier times out for the others, and the error crosses back
    as text (an exception that does not pickle would stall the pool).
    """
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(len(args), timeout=_BARRIER_SECONDS)
        with ctx.Pool(len(args)) as pool:
            return pool.starmap(_guarded, [(target, *a, barrier) for a in args])


_BARRIER_SECONDS = 300.0


def _guarded(target: Any, *args: Any) -> Result:
    try:
        result: Result = target(*args)
    except BaseException:
        raise RuntimeError(f"{target.__name__} failed in process {os.getpid()}:\n{traceback.format_exc()}") from None
    return result


def rate(results: list[Result]) -> tuple[int, float]:
    count = sum(len(r.ops) for r in results)
    return count, max(r.ended for r in results) - min(r.started for r in results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _per_op(results: list[Result], kind: str) -> tuple[list[float], dict[str, float]]:
    """Latencies of one kind of operation, and its mean counts per operation."""
    ops = [op for r in results for op in r.ops if op.kind == kind]
    n = max(1, len(ops))
    means = {
        "txns": sum(op.commits for op in ops) / n,
        "reads": sum(op.rollbacks for op in ops) / n,
        "stmts": sum(op.statements for op in ops) / n,
        "pings": sum(op.pings for op in ops) / n,
        "trips": sum(round_trips(op) for op in ops) / n,
    }
    return [op.seconds for op in ops], means


def report_kinds(engine: list[Result], floor: list[Result]) -> None:
    """One line per kind of operation: latencies on each side, and what each sent the server per operation."""
    print(
        f"{'kind':<19}{'n':>5} | engine p50 {'p99':>6} | floor p50 {'p99':>6} | engine per op: txns reads stmts"
        " pings trips | floor per op: txns stmts trips  (ms; trips: round trips to the server)"
    )
    for kind in KINDS:
        took, mine = _per_op(engine, kind)
        if not took:
            continue
        raw, base = _per_op(floor, kind)
        print(
            f"{kind:<19}{len(took):>5} | {percentile(took, 0.5) * 1e3:10.1f} {percentile(took, 0.99) * 1e3:6.1f} | "
            f"{percentile(raw, 0.5) * 1e3:9.1f} {percentile(raw, 0.99) * 1e3:6.1f} | {mine['txns']:19.1f} "
            f"{mine['reads']:5.1f} {mine['stmts']:5.1f} {mine['pings']:5.1f} {mine['trips']:5.1f} | "
            f"{base['txns']:18.1f} {base['stmts']:5.1f} {base['trips']:5.1f}"
        )
    trips = [sum(round_trips(op) for r in side for op in r.ops) for side in (engine, floor)]
    count = rate(engine)[0]
    print(
        f"round trips per operation: engine {trips[0] / count:.1f}, floor {trips[1] / count:.1f} "
        f"({trips[0] / max(1, trips[1]):.2f}x)"
    )
    cpu = [sum(r.cpu for r in side) / count * 1e3 for side in (engine, floor)]
    print(
        f"client CPU per operation: engine {cpu[0]:.1f} ms, floor {cpu[1]:.1f} ms ({cpu[0] / max(cpu[1], 1e-9):.2f}x)"
    )
    pings = sum(op.pings for r in engine for op in r.ops) / count
    reads = sum(op.rollbacks for r in engine for op in r.ops) / count
    bracketed = sum(op.rollbacks - op.free_reads for r in engine for op in r.ops) / count
    print(
        f"what limits it: per operation the engine makes {trips[0] / max(1, trips[1]):.2f}x the floor's round trips "
        f"(of its {trips[0] / count:.1f}: {pings:.1f} pings, {reads:.1f} reads of which {bracketed:.1f} "
        f"between BEGIN and ROLLBACK) and spends {cpu[0] / max(cpu[1], 1e-9):.2f}x its client CPU"
    )


def check_hosts(db: sa.Engine) -> list[str]:
    """Every engine host's usage within its total times the allocation ratio, per resource."""
    broken = []
    with db.connect() as conn:
        for row in conn.execute(sa.select(H).where(H.c.name.like("storm-%"))).mappings():
            for resource, ratio in zip(("vcpus", "memory_mb", "disk_gb"), RATIOS, strict=True):
                if row[f"{resource}_used"] > row[resource] * ratio or row[f"{resource}_used"] < 0:
                    broken.append(
                        f"host {row['name']} {resource} used {row[f'{resource}_used']} of {row[resource]} x {ratio}"
                    )
    return broken


def check_chains(db: sa.Engine) -> tuple[int, list[str]]:
    """Every engine instance's audit rows chain (from = previous to) and end at the row's states."""
    broken: list[str] = []
    with db.connect() as conn:
        rows = {r.uuid: r for r in conn.execute(sa.select(I).where(I.c.name.like("storm-%")))}
        audits = conn.execute(
            sa.select(
                A.c.instance_uuid,
                A.c.id,
                A.c.from_vm_state,
                A.c.from_task_state,
                A.c.from_power_state,
                A.c.to_vm_state,
                A.c.to_task_state,
                A.c.to_power_state,
            )
            .where(A.c.instance_uuid.in_(list(rows)))
            .order_by(A.c.instance_uuid, A.c.id)
        ).all()
    state: dict[str, tuple[Any, ...]] = {}
    for a in audits:
        before = state.get(a.instance_uuid, (None, None, None))
        if (a.from_vm_state, a.from_task_state, a.from_power_state) != before:
            broken.append(
                f"instance {a.instance_uuid}: audit row {a.id} starts at {a[2:5]}, previous ended at {before}"
            )
        state[a.instance_uuid] = (a.to_vm_state, a.to_task_state, a.to_power_state)
    for uuid, row in rows.items():
        if state.get(uuid) != (row.vm_state, row.task_state, row.power_state):
            broken.append(
                f"instance {uuid}: audit ends at {state.get(uuid)}, "
                f"row is {(row.vm_state, row.task_state, row.power_state)}"
            )
        if row.task_id is not None:
            broken.append(f"instance {uuid}: task {row.task_id} still running")
    return len(rows), broken


def spawn_reschedules(db: sa.Engine) -> int:
    with db.connect() as conn:
        query = (
            sa.select(sa.func.count())
            .select_from(A)
            .where(A.c.operation == "create", A.c.message.like("%rescheduling%"))
        )
        return int(conn.execute(query).scalar_one())


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=os.environ.get("LIFECYCLE_TEST_PG_URL"), help="PostgreSQL server URL")
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--fill", type=float, default=1.25, help="peak demand / what the hosts hold")
    parser.add_argument("--in-place", action="store_true", help="use the URL's database instead of a scratch one")
    args = parser.parse_args()
    if not args.db or not args.db.startswith("postgresql"):
        parser.error("--db must be a PostgreSQL URL (or set LIFECYCLE_TEST_PG_URL)")
    _quiet()
    p = plan(args.ops, args.procs, args.hosts, args.fill)
    with scratch_database(args.db, args.in_place) as url:
        image = prepare(url, args.hosts, p.host_memory_mb)
        print(
            f"storm: {args.procs} processes, one engine each, {args.hosts} fake hosts ({p.host_memory_mb} MiB x "
            f"{RATIOS[1]} RAM each), {args.ops} operations; window {p.window} live instances per process; hosts hold "
            f"{p.room:.0%} of the peak demand"
        )
        engine = run_processes(engine_worker, [(url, i, b, p.window, image) for i, b in enumerate(p.budgets)])
        floor_hosts = prepare_floor(url, args.hosts, p.host_memory_mb)
        floor = run_processes(floor_worker, [(url, i, r.ops, floor_hosts, image) for i, r in enumerate(engine)])
        db = sa.create_engine(url)
        try:
            broken = check_hosts(db)
            instances, chains = check_chains(db)
            reschedules = spawn_reschedules(db)
        finally:
            db.dispose()
    return report(engine, floor, broken, instances, chains, reschedules)


def report(
    engine: list[Result], floor: list[Result], hosts: list[str], instances: int, chains: list[str], reschedules: int
) -> int:
    (count, took), (raw_count, raw_took) = rate(engine), rate(floor)
    ops_s, raw_s = count / took, raw_count / raw_took
    print(f"engine: {count} operations in {took:.2f} s = {ops_s:.1f} ops/s")
    print(
        f"floor:  {raw_count} operations in {raw_took:.2f} s = {raw_s:.1f} ops/s "
        "(as many transactions per operation, SQLAlchemy Core)"
    )
    print(f"ratio engine/floor: {ops_s / raw_s:.2f}x (target >= 0.6x: {verdict(ops_s / raw_s >= 0.6)})")
    report_kinds(engine, floor)
    ops = [op for r in engine for op in r.ops]
    creates = [op for op in ops if op.kind.startswith("create")]
    raced = [op for op in creates if op.lost_claims > 0]
    share = len(raced) / max(1, len(creates))
    last_room = sum(op.kind == "create:novalidhost" for op in raced)
    settled = sum(op.later_candidates > 0 for op in creates)
    kinds = Counter(op.kind for op in ops)
    print(
        f"claim races: {sum(op.lost_claims for op in creates)} lost claims; reschedules caused by racing claims: "
        f"{len(raced)} of {len(creates)} creates = {share:.1%} (target < 5%: {verdict(share < 0.05)}; "
        f"{last_room} of them then found no room anywhere: NoValidHost); NoValidHost: "
        f"{kinds['create:novalidhost']}; reschedules after a failed spawn: {reschedules}"
    )
    print(
        f"claim races settled inside the database (claimed a later candidate than the first choice, no re-read): "
        f"{settled} of {len(creates)} creates = {settled / max(1, len(creates)):.1%}"
    )
    print(f"hosts over an allocation ratio: {len(hosts)}" + "".join(f"\n  {b}" for b in hosts[:20]))
    print(
        f"audit chains checked: {instances} instances, {len(chains)} inconsistent"
        + "".join(f"\n  {b}" for b in chains[:20])
    )
    ok = not hosts and not chains and instances > 0
    print(f"invariants: {'hold' if ok else 'BROKEN'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
