"""Audit queries across instances: each filter returns exactly its rows, reads one index range, and bad input is refused."""

from __future__ import annotations

import json
import threading
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from lifecycle import AuditEntry, Engine, InvalidInput, PowerState, TaskFailed
from lifecycle.audit import audit_query
from lifecycle.cli import main
from lifecycle.store.feed import audit_select
from lifecycle.store.tables import AUDITS, HOSTS, IMAGES, INSTANCES
from tests.conftest import FLAVOR, Fakes, make_engine

NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Story:
    """What happened in the database the tests query: which instance did what, under which request."""

    stopped: str
    broken: str
    synced: str
    request: str


@pytest.fixture
def story(engine: Engine, fakes: Fakes) -> Story:
    """API operations on h1 and h2, a build that failed into error and was deleted, a sync pass that recorded power."""
    stopped = engine.create("stopped", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    engine.stop(stopped, request_id="req-stop")
    synced = engine.create("synced", host="h2", flavor=FLAVOR, image="cirros").instance_uuid
    fakes["h2"].set_power(synced, PowerState.SHUTDOWN, event=False)
    engine.hosts.sync("h2")
    fakes["h1"].faults.fail_next("spawn")
    with pytest.raises(TaskFailed):
        engine.create("broken", host="h1", flavor=FLAVOR, image="cirros", request_id="req-broken")
    broken = next(i.uuid for i in engine.list() if i.name == "broken")
    engine.delete(broken)  # error -> error: a change that does not go *into* error
    return Story(stopped, broken, synced, "req-stop")


def _everything(engine: Engine) -> list[AuditEntry]:
    rows = [e for i in engine.list(include_deleted=True) for e in engine.history(i.uuid)]
    return sorted(rows, key=lambda e: (e.created_at, e.id))


FILTERS: list[tuple[str, dict[str, Any], Callable[[AuditEntry], bool]]] = [
    ("request", {"request_id": "req-stop"}, lambda e: e.request_id == "req-stop"),
    ("host", {"host": "h2"}, lambda e: e.host == "h2"),
    ("host-and-cause", {"host": "h2", "cause": "sync"}, lambda e: e.host == "h2" and e.cause == "sync"),
    ("cause", {"cause": "sync"}, lambda e: e.cause == "sync"),
    ("operation", {"operation": "stop"}, lambda e: e.operation == "stop"),
    (
        "into-error",
        {"vm_state": "error"},
        lambda e: e.to_vm_state == "error" and e.from_vm_state != "error",
    ),
    ("since", {"since": NOW - timedelta(days=1)}, lambda e: e.created_at >= NOW - timedelta(days=1)),
    ("until-the-past", {"until": NOW - timedelta(days=1)}, lambda e: False),
]


@pytest.mark.parametrize(("kw", "admits"), [pytest.param(kw, admits, id=name) for name, kw, admits in FILTERS])
def test_each_filter_returns_exactly_its_rows(
    engine: Engine, story: Story, kw: dict[str, Any], admits: Callable[[AuditEntry], bool]
) -> None:
    """engine.feed.audit returns the rows the filter admits, across instances, oldest first, and no other."""
    expected = [e for e in _everything(engine) if admits(e)]
    assert engine.feed.audit(**kw) == expected
    assert expected or kw.keys() == {"until"}, "the story must give every filter something to find"


def test_which_instances_went_to_error(engine: Engine, story: Story) -> None:
    """vm_state=error finds the failed build's change into error, not its later delete that stays in error."""
    (entered,) = engine.feed.audit(vm_state="error", since=NOW - timedelta(hours=1))
    assert (entered.instance_uuid, entered.from_vm_state, entered.to_vm_state) == (story.broken, "building", "error")
    assert any(e.from_vm_state == e.to_vm_state == "error" for e in engine.history(story.broken))


def test_what_sync_changed_on_a_host(engine: Engine, story: Story) -> None:
    """host + cause=sync over a window finds the stop the sync pass ran on that host, and nothing else."""
    found = engine.feed.audit(host="h2", cause="sync", since=NOW - timedelta(hours=1), until=datetime.now(UTC))
    assert [(e.instance_uuid, e.operation, e.to_vm_state) for e in found] == [
        (story.synced, "stop", "active"),
        (story.synced, "stop", "stopped"),
    ]
    assert found[-1].to_power_state == 4


def test_a_window_and_a_limit(engine: Engine, story: Story) -> None:
    """since is inclusive and until exclusive; limit keeps the oldest rows of the window."""
    rows = _everything(engine)
    middle = rows[len(rows) // 2]
    assert engine.feed.audit(since=middle.created_at) == [e for e in rows if e.created_at >= middle.created_at]
    assert engine.feed.audit(until=middle.created_at) == [e for e in rows if e.created_at < middle.created_at]
    assert engine.feed.audit(limit=3) == rows[:3]


def test_rows_name_the_host_a_forced_removal_took_them_off(engine: Engine) -> None:
    """The audit row of an instance orphaned by a forced host removal names the host it was on."""
    engine.hosts.add("h3", "fake://")
    uuid = engine.create("vm", host="h3", flavor=FLAVOR, image="cirros").instance_uuid
    engine.hosts.remove("h3", force=True)
    last = engine.history(uuid)[-1]
    assert (last.host, engine.get(uuid).host) == ("h3", None)
    assert engine.feed.audit(host="h3")[-1] == last


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"since": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"until": "2026-01-01"}, "timezone-aware"),
        ({"since": NOW, "until": NOW}, "must be before until"),
        ({"cause": "boredom"}, "unknown cause 'boredom': expected one of api, sync"),
        ({"cause": 3}, "unknown cause"),
        ({"vm_state": "asleep"}, "unknown vm_state 'asleep'"),
        ({"limit": 0}, "limit must be an integer from 1 to 100000"),
        ({"limit": 100_001}, "limit"),
        ({"limit": True}, "limit"),
        ({"host": "h\x1b"}, "host"),
        ({"host": ""}, "host"),
        ({"request_id": "r" * 65}, "at most 64"),
        ({"operation": "o" * 65}, "at most 64"),
        ({"operation": 7}, "operation"),
    ],
)
def test_bad_filters_are_refused(engine: Engine, kw: dict[str, Any], needle: str) -> None:
    """Each bad filter is InvalidInput naming what was wrong."""
    with pytest.raises(InvalidInput, match=needle.replace("(", r"\(")):
        engine.feed.audit(**kw)


INDEX_OF: list[tuple[str, dict[str, Any], str]] = [
    ("time", {"since": NOW - timedelta(hours=1), "until": NOW}, "ix_audit_log_created_at"),
    ("request", {"request_id": "r1"}, "ix_audit_log_request"),
    ("host-cause-night", {"host": "h1", "cause": "sync", "since": NOW - timedelta(hours=8)}, "ix_audit_log_host_cause"),
    ("host", {"host": "h1", "since": NOW - timedelta(hours=2)}, "ix_audit_log_host_cause"),
    ("cause", {"cause": "event", "since": NOW - timedelta(hours=1)}, "ix_audit_log_cause"),
    ("operation", {"operation": "stop", "since": NOW - timedelta(hours=6)}, "ix_audit_log_operation"),
    ("into-error", {"vm_state": "error", "since": NOW - timedelta(days=1)}, "ix_audit_log_entered"),
]


@pytest.mark.parametrize(("kw", "index"), [pytest.param(kw, index, id=name) for name, kw, index in INDEX_OF])
def test_each_query_is_one_index_range_on_sqlite(sqlite_url: str, kw: dict[str, Any], index: str) -> None:
    """SQLite's plan searches the query's index with every filter as a bound of the range: it reads only what it returns."""
    db = sa.create_engine(sqlite_url)
    query = audit_select(audit_query(**kw))
    sql = str(query.compile(db, compile_kwargs={"literal_binds": True}))
    with db.connect() as conn:
        plan = " ".join(row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
    db.dispose()
    assert f"SEARCH audit_log USING INDEX {index} (" in plan, plan
    bounded = plan.split("(", 1)[1]
    for column in ("request_id", "host", "cause", "operation", "to_vm_state", "created_at"):
        wanted = {"request_id": "request_id", "host": "host", "cause": "cause", "operation": "operation"}.get(column)
        if (wanted and kw.get(wanted) is not None) or (column == "to_vm_state" and "vm_state" in kw):
            assert f"{column}=" in bounded, plan
    if "since" in kw:
        assert "created_at>" in bounded, plan


def _synthetic_log(url: str, count: int) -> None:
    """Write ``count`` audit rows over 20 hosts and two days straight into the tables (instances, hosts, image)."""
    db = sa.create_engine(url)
    past = NOW - timedelta(days=3)
    hosts = [
        {"name": f"s{h}", "driver_uri": "fake://", "instances_path": "/x", "enabled": True, "created_at": past}
        for h in range(20)
    ]
    instance = {
        "flavor_name": "tiny",
        "vcpus": 1,
        "memory_mb": 64,
        "root_gb": 1,
        "image": "cirros",
        "vm_state": "active",
    }
    instance |= {"power_state": 1, "version": 1, "created_at": past, "updated_at": past}
    uuids = [str(uuidlib.UUID(int=i + 1)) for i in range(400)]
    rows = []
    for n in range(count):
        cause = ("api", "sync", "sync", "event")[n % 4]
        rows.append(
            {
                "instance_uuid": uuids[n % 400],
                "host": f"s{n // 4 % 20}",
                "request_id": f"req-{n // 3}" if cause == "api" else None,
                "actor": cause,
                "cause": cause,
                "operation": ("stop", "start", "reboot")[n % 3] if cause == "api" else "sync",
                "from_vm_state": "active",
                "to_vm_state": "error" if n % 97 == 0 else "active",
                "to_power_state": 1,
                "created_at": NOW - timedelta(days=2) + timedelta(seconds=n * 172800 / count),
            }
        )
    with db.begin() as conn:
        conn.execute(sa.insert(HOSTS), hosts)
        conn.execute(
            sa.insert(IMAGES),
            {"name": "cirros", "path": "/i", "disk_format": "qcow2", "min_disk_gb": 0, "created_at": past},
        )
        conn.execute(
            sa.insert(INSTANCES),
            [{**instance, "uuid": u, "name": f"vm{i}", "host": f"s{i % 20}"} for i, u in enumerate(uuids)],
        )
        conn.execute(sa.insert(AUDITS), rows)
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    db.dispose()


def _filtered(plan: dict[str, Any]) -> list[str]:
    """The conditions the plan's audit_log scans check row by row instead of bounding their index range."""
    own = [plan["Filter"]] if plan.get("Relation Name") == "audit_log" and "Filter" in plan else []
    return own + [f for child in plan.get("Plans", []) for f in _filtered(child)]


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's audit_log scans produced plus those their filters threw away."""
    own = 0
    if plan.get("Relation Name") == "audit_log":
        removed = plan.get("Rows Removed by Filter", 0) + plan.get("Rows Removed by Index Recheck", 0)
        own = (plan["Actual Rows"] + removed) * plan["Actual Loops"]
    return own + sum(_rows_read(child) for child in plan.get("Plans", []))


@pytest.mark.postgres
@pytest.mark.parametrize(
    "kw",
    [
        {"request_id": "req-1500"},
        {"host": "s7", "cause": "sync", "since": NOW - timedelta(hours=30), "until": NOW - timedelta(hours=22)},
        {"vm_state": "error", "since": NOW - timedelta(hours=24)},
        {"operation": "stop", "since": NOW - timedelta(hours=3)},
        {"cause": "event", "since": NOW - timedelta(hours=2)},
        {"since": NOW - timedelta(hours=5), "until": NOW - timedelta(hours=4)},
        {"host": "s3", "since": NOW - timedelta(hours=2)},
    ],
    ids=["request", "sync-on-a-host-overnight", "into-error-today", "operation", "cause", "window", "host"],
)
def test_each_query_reads_only_what_it_returns_on_postgres(pg_url: str, kw: dict[str, Any]) -> None:
    """On 20000 analysed rows, EXPLAIN ANALYZE shows the audit_log scan read exactly the rows returned, every filter bounding its index range."""
    from lifecycle import upgrade

    upgrade(pg_url)
    _synthetic_log(pg_url, 20_000)
    query = audit_select(audit_query(**kw))
    db = sa.create_engine(pg_url)
    with db.connect() as conn:
        sql = str(query.compile(db, compile_kwargs={"literal_binds": True}))
        plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").scalar_one()[0]["Plan"]
        returned = len(conn.execute(query).all())
    db.dispose()
    assert returned > 0
    assert _rows_read(plan) == returned, json.dumps(plan, indent=1)
    assert _filtered(plan) == [], "a filter is checked on rows the index range yields, not bounding it"


# -- the command line ---------------------------------------------------------------------------------


@pytest.fixture
def cli(db_url: str, fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run `lifecycle --db URL ...` in-process; return (code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--db", db_url, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_the_audit_command_prints_rows_and_json(engine: Engine, story: Story, cli: Any) -> None:
    """`lifecycle audit` prints one line per row with its position; --json gives the rows with their fields and position."""
    code, out, _ = cli("audit", "--request-id", "req-stop")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and all(story.stopped in line and "request=req-stop" in line for line in lines)
    code, out, _ = cli("audit", "--vm-state", "error", "--since", "1h", "--json")
    (row,) = json.loads(out)
    assert (code, row["instance_uuid"], row["to_vm_state"], row["host"]) == (0, story.broken, "error", "h1")
    assert row["position"] == f"{row['tx']}:{row['id']}"
    code, out, _ = cli("audit", "--host", "h2", "--cause", "sync", "--since", "2000-01-01", "--until", "2100-01-01")
    assert code == 0 and len(out.splitlines()) == 2 and all("sync:sync op=stop" in line for line in out.splitlines())


def test_the_changes_command(engine: Engine, story: Story, cli: Any) -> None:
    """`lifecycle changes` prints the feed as lines, JSON lines or Nova notifications; --consumer goes on where it stopped."""
    feed = engine.feed.changes(limit=10_000)
    code, out, _ = cli("changes", "--json", "--limit", "10000")
    assert code == 0 and [json.loads(line)["position"] for line in out.splitlines()] == [str(c.position) for c in feed]
    code, out, _ = cli("changes", "--after", str(feed[-2].position))
    assert code == 0 and out.startswith(str(feed[-1].position)) and len(out.splitlines()) == 1
    code, out, _ = cli("changes", "--format", "nova", "--after", str(feed[-2].position))
    assert json.loads(out)["event_type"] == "instance.update"
    code, out, _ = cli("changes", "--consumer", "cron", "--limit", "4", "--json")
    assert [json.loads(line)["position"] for line in out.splitlines()] == [str(c.position) for c in feed[:4]]
    code, out, _ = cli("changes", "--consumer", "cron", "--limit", "2", "--json")
    assert [json.loads(line)["position"] for line in out.splitlines()] == [str(c.position) for c in feed[4:6]]
    code, out, _ = cli("changes", "consumers", "--json")
    assert json.loads(out)[0]["name"] == "cron" and json.loads(out)[0]["position"] == str(feed[5].position)
    assert cli("changes", "--after", "end")[1] == "no changes\n"
    code, out, _ = cli("changes", "prune", "--json")
    assert (code, json.loads(out)) == (0, {"pruned": 0})
    code, out, _ = cli("changes", "forget", "cron")
    assert code == 0 and engine.feed.consumers() == []


def test_changes_follow_prints_as_changes_commit_and_stops_on_sigterm(tmp_path: Path, fakes: Fakes) -> None:
    """`lifecycle changes --follow --json` prints each change as it commits, and exits 0 on SIGTERM."""
    import signal
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'follow.db'}"
    from lifecycle import upgrade

    upgrade(url)
    engine = make_engine(url, fakes, feed_poll_interval=0.02)
    argv = [sys.executable, "-m", "lifecycle.cli", "--db", url, "changes", "--follow", "--json"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as follower:
        assert follower.stdout is not None
        guard = threading.Timer(30, follower.kill)  # a follower that prints nothing fails the test, not hangs it
        guard.start()
        uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
        first = json.loads(follower.stdout.readline())  # waits for the follower to print it
        follower.send_signal(signal.SIGTERM)
        rest = follower.stdout.read()  # the same buffered reader: communicate() would skip what readline() buffered
        follower.wait(10)
        guard.cancel()
        assert follower.stderr is not None
        err = follower.stderr.read()
    assert follower.returncode == 0, err
    assert first["instance_uuid"] == uuid and first["new_task_state"] == "scheduling"
    printed = [first, *(json.loads(line) for line in rest.splitlines())]
    assert [p["position"] for p in printed] == [str(c.position) for c in engine.feed.changes(limit=10_000)][
        : len(printed)
    ]
    engine.close()
