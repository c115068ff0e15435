"""Benchmark: the change feed against a plain select, and audit queries on a big log, same run.

1. Feed throughput while writers run: a backlog of N committed changes, W
   writer processes running stop/start cycles all along; a follower
   (``engine.feed.follow`` as a named consumer, batches of B, its position stored
   after each) delivers the backlog, then a plain select reads the same rows
   (``SELECT * FROM audit_log WHERE id > ? ORDER BY id LIMIT B``, rows as
   tuples). Target: the feed at least 0.5x the select's changes per second.
2. Writers' cost: stop/start cycles through the engine at head, against the
   same on a copy without what the feed adds to each write (its indexes and,
   on PostgreSQL, the trigger that orders and notifies).
3. Audit queries on a log of R rows (default one million) over 100 hosts and
   30 days: each query's rows returned beside the rows it read, from the plan:
   PostgreSQL's ``EXPLAIN ANALYZE`` (rows the audit_log scan nodes produced
   plus those their filters removed), SQLite's ``EXPLAIN QUERY PLAN`` (the
   rows of the index range it names, counted). Target: read = returned.

    python bench/changes.py [--pg-url postgresql+psycopg://u@h/db] [--backlog 100000] [--rows 1000000]

Without ``--pg-url`` everything runs on SQLite files; with it, on scratch
databases created (and dropped) on that server.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/transitions.py, which would shadow the `transitions`
# library the engine imports: take the folder off sys.path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import logging
import multiprocessing
import random
import re
import statistics
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from lifecycle import Engine, Flavor, Settings, upgrade
from lifecycle.audit import AuditQuery, Change, Why, audit_query
from lifecycle.records import Cause
from lifecycle.store import tables
from lifecycle.store._cas import audit
from lifecycle.store.db import connect
from lifecycle.store.feed import audit_select

AUDIT = tables.AUDITS
FLAVOR = Flavor(vcpus=1, memory_mb=64, root_gb=1, name="tiny")


# -- databases ---------------------------------------------------------------------------------------


class Databases:
    """Scratch databases: SQLite files in a folder, or PostgreSQL databases on one server."""

    def __init__(self, folder: Path, pg_url: str | None) -> None:
        self.folder, self.pg_url = folder, pg_url
        self.made: list[str] = []

    def new(self, name: str) -> str:
        if self.pg_url is None:
            url = f"sqlite:///{self.folder / f'{name}-{uuidlib.uuid4().hex[:8]}.db'}"
        else:
            db = f"bench_{name}_{uuidlib.uuid4().hex[:8]}"
            with self._admin() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE {db}")
            self.made.append(db)
            url = self.pg_url.rsplit("/", 1)[0] + f"/{db}"
        upgrade(url)
        return url

    @contextmanager
    def _admin(self) -> Iterator[sa.Connection]:
        assert self.pg_url is not None
        admin = sa.create_engine(self.pg_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                yield conn
        finally:
            admin.dispose()

    def drop_all(self) -> None:
        if self.pg_url is not None:
            with self._admin() as conn:
                for db in self.made:
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _instances(engine: Engine, folder: Path, count: int) -> list[str]:
    engine.hosts.add("h1", f"fake://{folder / f'h1-{uuidlib.uuid4().hex[:6]}.json'}")
    image = folder / "cirros.qcow2"
    image.write_bytes(b"QFI\xfb")
    engine.images.add("cirros", str(image))
    return [engine.create(f"vm{i}", host="h1", flavor=FLAVOR, image="cirros").instance_uuid for i in range(count)]


# -- 1. feed throughput while writers run -----------------------------------------------------------


def _writer(url: str, uuids: list[str], stop: Any, done: Any) -> None:
    """Stop and start the given instances round and round until told to stop; count the cycles."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with Engine(url, settings=Settings(shutdown_timeout=0)) as engine:
        while not stop.is_set():
            for uuid in uuids:
                engine.stop(uuid)
                engine.start(uuid)
                with done.get_lock():
                    done.value += 1


def _backlog(engine: Engine, uuids: list[str], count: int) -> tuple[int, int]:
    """Commit ``count`` changes (notes, 1000 per transaction); return the first and last audit ids."""
    why = Why(actor="bench", cause=Cause.API, operation="note", message="backlog")
    instances = [engine.get(uuid) for uuid in uuids]
    for start in range(0, count, 1000):
        with engine.store.engine.begin() as conn:
            for i in range(start, min(count, start + 1000)):
                audit(conn, instances[i % len(instances)], instances[i % len(instances)], why, always=True)
    ids = sa.select(sa.func.min(AUDIT.c.id), sa.func.max(AUDIT.c.id)).where(AUDIT.c.message == "backlog")
    with engine.store.engine.connect() as conn:
        first, last = conn.execute(ids).one()
    return first, last


def _follow_rate(engine: Engine, name: str, backlog: int, batch: int) -> tuple[float, float]:
    """Deliver the backlog to a new consumer; return changes per second of wall time and of this process's CPU."""
    stop, seen = threading.Event(), [0]

    def handler(change: Change) -> None:
        if change.message == "backlog":
            seen[0] += 1
            if seen[0] == backlog:
                stop.set()

    started, cpu = time.perf_counter(), time.process_time()
    engine.feed.follow(name, handler, stop=stop, batch=batch)
    return backlog / (time.perf_counter() - started), backlog / (time.process_time() - cpu)


def _select_rate(engine: Engine, first: int, last: int, batch: int) -> tuple[float, float]:
    """Read the backlog's rows in pages by id; return rows per second of wall time and of this process's CPU."""
    query = sa.select(AUDIT).where(AUDIT.c.id > sa.bindparam("after"), AUDIT.c.id <= last)
    query = query.order_by(AUDIT.c.id).limit(batch)
    started, cpu, after, rows = time.perf_counter(), time.process_time(), first - 1, 0
    # A reader as the engine's reads are (on SQLite a plain connect() would BEGIN IMMEDIATE: stop the writers).
    with engine.store.engine.connect().execution_options(readonly=True) as conn:
        while page := conn.execute(query, {"after": after}).all():
            rows += len(page)
            after = page[-1].id
    return rows / (time.perf_counter() - started), rows / (time.process_time() - cpu)


def feed_throughput(dbs: Databases, folder: Path, backlog: int, writers: int, batch: int, runs: int) -> None:
    url = dbs.new("feed")
    with Engine(url) as engine:
        uuids = _instances(engine, folder, 4 * writers + 4)
        first, last = _backlog(engine, uuids[: 4 * writers], backlog)
        ctx = multiprocessing.get_context("spawn")
        stop, done = ctx.Event(), ctx.Value("i", 0)
        procs = [ctx.Process(target=_writer, args=(url, uuids[4 * w : 4 * w + 4], stop, done)) for w in range(writers)]
        for p in procs:
            p.start()
        try:
            while done.value < writers:  # every writer is writing
                time.sleep(0.05)
            feeds, selects = [], []
            started, cycles = time.perf_counter(), done.value
            for run in range(runs):  # alternating which goes first, so load drifting hits both alike
                if run % 2:
                    selects.append(_select_rate(engine, first, last, batch))
                feeds.append(_follow_rate(engine, f"bench-{run}", backlog, batch))
                if not run % 2:
                    selects.append(_select_rate(engine, first, last, batch))
            write_rate = (done.value - cycles) * 4 / (time.perf_counter() - started)
        finally:
            stop.set()
            for p in procs:
                p.join()
    feed, select = (statistics.median(r[0] for r in rates) for rates in (feeds, selects))
    feed_cpu, select_cpu = (statistics.median(r[1] for r in rates) for rates in (feeds, selects))
    ratio = feed / select
    print(
        f"feed while {writers} writers run ({write_rate:.0f} changes/s written): {backlog} changes, batch {batch}:"
        f" follow {feed:9.0f}/s  plain select {select:9.0f}/s  ratio feed/select {ratio:4.2f}x"
        f" (target >= 0.5x: {'met' if ratio >= 0.5 else 'NOT met'}); per CPU second {feed_cpu:.0f}/s and"
        f" {select_cpu:.0f}/s: {feed_cpu / select_cpu:4.2f}x; medians of {runs}"
    )


# -- 2. what the feed costs a writer ----------------------------------------------------------------

_FEED_INDEXES = (
    "ix_audit_log_feed",
    "ix_audit_log_instance_tx",
    "ix_audit_log_created_at",
    "ix_audit_log_request",
    "ix_audit_log_host_cause",
    "ix_audit_log_cause",
    "ix_audit_log_operation",
    "ix_audit_log_entered",
)


def _without_feed(url: str) -> None:
    db = connect(url)
    with db.begin() as conn:
        for name in _FEED_INDEXES:
            conn.exec_driver_sql(f"DROP INDEX {name}")
        if db.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE audit_log DISABLE TRIGGER audit_log_feed")
    db.dispose()


def _cycle_time(url: str, folder: Path, cycles: int) -> float:
    with Engine(url, settings=Settings(shutdown_timeout=0)) as engine:
        (uuid,) = _instances(engine, folder, 1)
        started = time.perf_counter()
        for _ in range(cycles):
            engine.stop(uuid)
            engine.start(uuid)
        return (time.perf_counter() - started) / (2 * cycles)


def writer_cost(dbs: Databases, folder: Path, cycles: int, runs: int) -> None:
    withs, withouts = [], []
    for _ in range(runs):
        withs.append(_cycle_time(dbs.new("with"), folder, cycles))
        plain = dbs.new("without")
        _without_feed(plain)
        withouts.append(_cycle_time(plain, folder, cycles))
    with_feed, without = statistics.median(withs), statistics.median(withouts)
    print(
        f"writer cost: {with_feed * 1000:6.2f} ms per operation with the feed's indexes and trigger,"
        f" {without * 1000:6.2f} ms without: ratio {with_feed / without:4.2f}x; medians of {runs} x {cycles} cycles"
    )


# -- 3. audit queries on a big log ------------------------------------------------------------------

HOSTS, INSTANCES, DAYS = 100, 20_000, 30
OPS = ("stop", "start", "reboot", "pause", "unpause", "suspend", "resume", "rebuild", "migrate", "delete")


def _rows(count: int, end: datetime, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Audit rows in id order over DAYS days up to ``end``: api requests, sync and event changes, some errors."""
    step = timedelta(days=DAYS) / count
    at, row, request = end - timedelta(days=DAYS), 0, 0
    while row < count:
        i = rng.randrange(INSTANCES)
        uuid, host = str(uuidlib.UUID(int=i + 1)), f"h{i % HOSTS}"
        kind = rng.random()
        if kind < 0.5:  # an api operation: a request of 2 to 5 rows
            request += 1
            op, size = rng.choice(OPS), rng.randint(2, 5)
            rows = [("api", "api", op, f"req-{request}", "active", "active") for _ in range(size)]
            if rng.random() < 0.02:
                rows[-1] = ("api", "api", op, f"req-{request}", "active", "error")
        elif kind < 0.9:
            rows = [("sync", "sync", "sync", None, "active", "stopped" if rng.random() < 0.5 else "active")]
        else:
            rows = [("event", "event", "sync", None, "active", "active")]
        for cause, actor, op, req, before, after in rows:
            row += 1
            at += step
            yield {
                "id": row,
                "instance_uuid": uuid,
                "task_id": None,
                "request_id": req,
                "actor": actor,
                "cause": cause,
                "operation": op,
                "rule": None,
                "from_vm_state": before,
                "to_vm_state": after,
                "from_task_state": None,
                "to_task_state": None,
                "from_power_state": 1,
                "to_power_state": 1,
                "message": None,
                "created_at": at,
                "host": host,
                "tx": row,
            }
            if row == count:
                return


def build_log(url: str, count: int, end: datetime) -> None:
    """Fill hosts, instances and ``count`` audit rows (the PostgreSQL trigger off while loading: tx = id)."""
    db = connect(url)
    past = end - timedelta(days=DAYS + 1)
    with db.begin() as conn:
        conn.execute(
            sa.insert(tables.HOSTS),
            [
                {"name": f"h{h}", "driver_uri": "fake://", "instances_path": "/x", "enabled": True, "created_at": past}
                for h in range(HOSTS)
            ],
        )
        conn.execute(
            sa.insert(tables.IMAGES),
            {"name": "cirros", "path": "/i", "disk_format": "qcow2", "min_disk_gb": 0, "created_at": past},
        )
        instance = {
            "flavor_name": "tiny",
            "vcpus": 1,
            "memory_mb": 64,
            "root_gb": 1,
            "image": "cirros",
            "vm_state": "active",
            "power_state": 1,
            "version": 1,
            "created_at": past,
            "updated_at": past,
        }
        conn.execute(
            sa.insert(tables.INSTANCES),
            [
                {**instance, "uuid": str(uuidlib.UUID(int=i + 1)), "name": f"vm{i}", "host": f"h{i % HOSTS}"}
                for i in range(INSTANCES)
            ],
        )
    rows = _rows(count, end, random.Random(7))
    with db.begin() as conn:
        if db.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")  # no trigger: tx is given
        while chunk := [r for _, r in zip(range(20_000), rows, strict=False)]:
            conn.execute(sa.insert(AUDIT), chunk)
        if db.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('audit_log', 'id'), max(id)) FROM audit_log")
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    db.dispose()


def _pg_read(plan: dict[str, Any]) -> tuple[int, list[str]]:
    """Rows the audit_log scans of a plan produced or filtered out, and the indexes the plan used."""
    read = 0
    if plan.get("Relation Name") == "audit_log":
        removed = plan.get("Rows Removed by Filter", 0) + plan.get("Rows Removed by Index Recheck", 0)
        read = (plan["Actual Rows"] + removed) * plan["Actual Loops"]
    indexes = [plan["Index Name"]] if "Index Name" in plan else []
    if plan.get("Node Type") == "Seq Scan":
        indexes.append("seq scan")
    for child in plan.get("Plans", []):
        more, names = _pg_read(child)
        read, indexes = read + more, indexes + names
    return read, indexes


def _terms(select: sa.Select[Any]) -> list[Any]:
    where = select.whereclause
    return [] if where is None else list(where.clauses) if isinstance(where, sa.BooleanClauseList) else [where]


def _sqlite_read(conn: sa.Connection, q: AuditQuery) -> tuple[int, list[str]]:
    """Count the rows in the index range SQLite's plan names: the query's terms on the columns it lists."""
    select = audit_select(q)

    def sql(clause: Any) -> str:
        return str(clause.compile(conn, compile_kwargs={"literal_binds": True}))

    plan = " ".join(r[3] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql(select)}"))
    found = re.search(r"USING (?:COVERING )?INDEX (\w+) \((.*?)\)", plan)
    if found is None:  # a full scan reads every row
        return conn.exec_driver_sql("SELECT count(*) FROM audit_log").scalar_one(), [plan]
    index, used = found[1], set(re.findall(r"(\w+)(?:=|>|<| IN)", found[2]))
    terms = [sql(t) for t in _terms(select) if getattr(getattr(t, "left", None), "name", None) in used]
    (partial,) = [i.dialect_options["sqlite"]["where"] for i in AUDIT.indexes if i.name == index]
    if partial is not None:
        terms.append(str(partial))
    where = " AND ".join(terms) or "1"
    return conn.exec_driver_sql(f"SELECT count(*) FROM audit_log INDEXED BY {index} WHERE {where}").scalar_one(), [
        index
    ]


def audit_queries(dbs: Databases, rows: int) -> None:
    end = datetime.now(UTC).replace(microsecond=0)
    url = dbs.new("audit")
    started = time.perf_counter()
    build_log(url, rows, end)
    built = time.perf_counter() - started
    night = (end - timedelta(days=1)).replace(hour=22, minute=0, second=0)
    with connect(url).connect() as conn:  # a request from the middle of the log
        middle = sa.select(AUDIT.c.request_id).where(AUDIT.c.id >= rows // 2, AUDIT.c.request_id.is_not(None))
        request = conn.execute(middle.order_by(AUDIT.c.id).limit(1)).scalar_one()
    hours = timedelta(hours=1)
    queries: list[tuple[str, dict[str, Any]]] = [
        (f"what happened in request {request}", {"request_id": request}),
        (
            "what sync changed on h17 last night",
            {"host": "h17", "cause": "sync", "since": night, "until": night + 8 * hours},
        ),
        ("which instances went to error today", {"vm_state": "error", "since": end - 24 * hours}),
        ("stops in the last 6 hours", {"operation": "stop", "since": end - 6 * hours}),
        ("events in the last hour", {"cause": "event", "since": end - hours}),
        ("everything on h3 in the last 2 hours", {"host": "h3", "since": end - 2 * hours}),
        ("everything in one minute", {"since": end - 5 * hours, "until": end - 5 * hours + hours / 60}),
    ]
    kind = "postgresql" if dbs.pg_url else "sqlite"
    print(
        f"audit log of {rows} rows on {kind} ({HOSTS} hosts, {INSTANCES} instances, {DAYS} days;"
        f" built in {built:.0f} s)"
    )
    print(f"  {'query':<40} {'returned':>8} {'read':>8} {'ms':>7}  index")
    all_met = True
    with Engine(url) as engine:
        for label, filters in queries:
            t0 = time.perf_counter()
            returned = len(engine.feed.audit(**filters, limit=100_000))
            ms = (time.perf_counter() - t0) * 1000
            q = audit_query(**filters, limit=100_000)
            with engine.store.engine.connect() as conn:
                if kind == "postgresql":
                    sql = str(audit_select(q).compile(conn, compile_kwargs={"literal_binds": True}))
                    plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").scalar_one()
                    read, indexes = _pg_read((plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"])
                else:
                    read, indexes = _sqlite_read(conn, q)
            all_met &= read == returned
            print(f"  {label:<40} {returned:>8} {read:>8} {ms:>7.1f}  {', '.join(indexes)}")
    print(f"  rows read = rows returned for every query: {'met' if all_met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", help="a PostgreSQL server (any database on it): run there instead of SQLite")
    parser.add_argument("--backlog", type=int, default=100_000, help="changes the follower and the select read")
    parser.add_argument("--writers", type=int, default=2, help="writer processes running during the feed part")
    parser.add_argument("--batch", type=int, default=500, help="the follower's and the select's page size")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side (median reported)")
    parser.add_argument("--cycles", type=int, default=200, help="stop/start cycles per run of the writer cost")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the audit log the queries run on")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="lifecycle-bench-changes-") as scratch:
        dbs = Databases(Path(scratch), args.pg_url)
        try:
            feed_throughput(dbs, Path(scratch), args.backlog, args.writers, args.batch, args.runs)
            writer_cost(dbs, Path(scratch), args.cycles, args.runs)
            audit_queries(dbs, args.rows)
        finally:
            dbs.drop_all()


if __name__ == "__main__":
    main()
