"""The change feed: every audit row a change, in commit order, delivered at least once, never passed over."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from lifecycle import Change, Engine, InvalidInput, Position, Settings
from lifecycle.audit import START, Why
from lifecycle.clock import ManualClock
from lifecycle.feed import as_change, change_data, nova_notification
from lifecycle.records import Cause
from lifecycle.store._cas import audit
from tests.conftest import FLAVOR, Fakes, make_engine, wait_until
from tests.images import fake_image
from tests.invariants import check_invariants

POSTGRES_ONLY = pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
STOPPED = threading.Event()
STOPPED.set()
WAIT = 10.0
"""Seconds a test waits for a follower thread before it fails (it never waits that long when all is well)."""


def _all_rows(engine: Engine) -> list[Change]:
    """Every audit row as a change, in feed order, straight from the table."""
    entries = [e for i in engine.list(include_deleted=True) for e in engine.history(i.uuid)]
    return sorted((as_change(e) for e in entries), key=lambda c: c.position)


def _busy(engine: Engine, new_instance: Callable[..., str]) -> list[str]:
    a, b = new_instance("a"), new_instance("b", host="h2")
    engine.stop(a)
    engine.pause(b)
    engine.start(a)
    engine.delete(b)
    return [a, b]


def test_every_audit_row_is_a_change_in_commit_order(engine: Engine, new_instance: Callable[..., str]) -> None:
    """The feed from the start is exactly the audit log, each instance's changes in the order they were written."""
    uuids = _busy(engine, new_instance)
    feed = engine.feed.changes(limit=10_000)
    assert feed == _all_rows(engine)
    assert [c.position for c in feed] == sorted({c.position for c in feed})  # strictly increasing
    for uuid in uuids:
        assert [c.position.id for c in feed if c.instance_uuid == uuid] == [e.id for e in engine.history(uuid)]


def test_paging_by_position_neither_skips_nor_repeats(engine: Engine, new_instance: Callable[..., str]) -> None:
    """Reading three at a time from each page's last position yields the whole feed once."""
    _busy(engine, new_instance)
    pages, after = [], START
    while page := engine.feed.changes(after=str(after), limit=3):
        assert len(page) <= 3
        pages += page
        after = page[-1].position
    assert pages == engine.feed.changes(limit=10_000)
    assert engine.feed.changes(after=after) == []


def test_a_change_carries_the_audit_facts(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A stop's changes name the instance, host, old and new states, task, operation, actor, cause and request."""
    uuid = new_instance()
    task = engine.stop(uuid, request_id="req-feed-1", actor="alice")
    first, last = engine.feed.changes(after=engine.feed.changes(limit=10_000)[-3].position)
    assert (first.instance_uuid, first.host, first.task_id, first.operation) == (uuid, "h1", task.id, "stop")
    assert (first.actor, first.cause, first.request_id) == ("alice", "api", "req-feed-1")
    assert (first.old_vm_state, first.new_vm_state, first.old_task_state, first.new_task_state) == (
        "active",
        "active",
        None,
        "powering-off",
    )
    assert (last.new_vm_state, last.new_task_state, last.old_power_state, last.new_power_state) == (
        "stopped",
        None,
        1,
        4,
    )
    assert last.timestamp >= first.timestamp and last.timestamp.tzinfo is not None
    assert change_data(last)["position"] == str(last.position)


@pytest.mark.parametrize(
    "text", ["", "1", "1:", ":1", "a:b", "-1:2", "1:2:3", "01:2", " 1:2", "1:99999999999999999999"]
)
def test_a_malformed_position_is_refused(engine: Engine, text: str) -> None:
    """A position that is not TX:ID in plain digits within 64 bits is InvalidInput, for reads and follows alike."""
    with pytest.raises(InvalidInput, match="position"):
        engine.feed.changes(after=text)
    with pytest.raises(InvalidInput, match="position"):
        engine.feed.follow("c", lambda c: None, stop=STOPPED, after=text)
    assert engine.feed.consumers() == []


@pytest.mark.parametrize(
    ("kw", "needle"), [({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"), ({"limit": True}, "limit")]
)
def test_a_bad_limit_is_refused(engine: Engine, kw: dict[str, Any], needle: str) -> None:
    """A limit outside 1 to 10000 (or a bool) is InvalidInput."""
    with pytest.raises(InvalidInput, match=needle):
        engine.feed.changes(**kw)


def test_after_end_sees_only_changes_to_come(engine: Engine, new_instance: Callable[..., str]) -> None:
    """``after="end"`` returns nothing now, and a follow from there gets only later changes."""
    uuid = new_instance()
    assert engine.feed.changes(after="end") == []
    got: list[Change] = []
    engine.feed.follow("late", got.append, stop=STOPPED, after="end")
    engine.stop(uuid)
    engine.feed.follow("late", got.append, stop=STOPPED)
    assert [c.new_task_state for c in got] == ["powering-off", None] and {c.instance_uuid for c in got} == {uuid}


def test_the_position_is_stored_only_after_the_handler_returned(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """A handler failing at the third change leaves the consumer at the second; the next follow starts at the third."""
    _busy(engine, new_instance)
    feed = engine.feed.changes(limit=10_000)
    seen: list[Change] = []

    def fail_third(change: Change) -> None:
        if len(seen) == 2:
            raise RuntimeError("handler down")
        seen.append(change)

    with pytest.raises(RuntimeError, match="handler down"):
        engine.feed.follow("billing", fail_third, batch=50)
    assert [c.position for c in engine.feed.consumers()] == [feed[1].position]
    rest: list[Change] = []
    engine.feed.follow("billing", rest.append, stop=STOPPED, batch=10_000)
    assert seen + rest == feed


def test_a_consumer_registers_at_after_then_resumes_where_it_stopped(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """The first follow registers at ``after``; later follows ignore ``after`` and go on from the stored position."""
    _busy(engine, new_instance)
    feed = engine.feed.changes(limit=10_000)
    got: list[Change] = []
    engine.feed.follow("ops", got.append, stop=STOPPED, batch=2, after=feed[3].position)
    engine.feed.follow("ops", got.append, stop=STOPPED, batch=2, after=START)
    assert got == feed[4:8]
    (consumer,) = engine.feed.consumers()
    assert (consumer.name, consumer.position) == ("ops", feed[7].position)
    anonymous: list[Change] = []
    engine.feed.follow(None, anonymous.append, stop=STOPPED, batch=3, after=feed[0].position)
    assert anonymous == feed[1:4] and engine.feed.consumers() == [consumer]


def test_forgetting_a_consumer(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A forgotten consumer is gone from the list; forgetting an unknown one is InvalidInput naming the known."""
    new_instance()
    engine.feed.follow("a", lambda c: None, stop=STOPPED)
    engine.feed.follow("b", lambda c: None, stop=STOPPED)
    engine.feed.forget_consumer("a")
    assert [c.name for c in engine.feed.consumers()] == ["b"]
    with pytest.raises(InvalidInput, match=r"no feed consumer named 'a' \(consumers: b\)"):
        engine.feed.forget_consumer("a")


@pytest.mark.parametrize(
    ("consumer", "handler", "batch", "needle"),
    [
        ("", print, 1, "consumer"),
        ("c\n", print, 1, "consumer"),
        ("c", "not callable", 1, "handler"),
        ("c", print, 0, "batch"),
    ],
)
def test_a_bad_follow_is_refused_before_registering(
    engine: Engine, consumer: str, handler: Any, batch: int, needle: str
) -> None:
    """An empty or unprintable consumer name, a handler that is not callable or a bad batch registers nothing."""
    with pytest.raises(InvalidInput, match=needle):
        engine.feed.follow(consumer, handler, stop=STOPPED, batch=batch)
    assert engine.feed.consumers() == []


@contextmanager
def following(engine: Engine, consumer: str | None, handler: Callable[[Change], object]) -> Iterator[None]:
    """Run ``engine.feed.follow`` from the end of the feed (as it is now) in a thread for the block; it must stop when told."""
    # On PostgreSQL a transaction open anywhere in the cluster (another test run's) holds committed changes back
    # for a moment: "the end" is taken once this test's own are readable.
    wait_until("the changes committed so far readable", lambda: not engine.store.feed.held_back())
    stop, end = threading.Event(), engine.store.feed.newest() or START
    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.feed.follow(consumer, handler, stop=stop, after=end)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(WAIT)
    assert not thread.is_alive(), "the follower did not stop when told"
    assert errors == []


def test_a_follower_gets_later_commits_and_stops_when_told(db_url: str, fakes: Fakes) -> None:
    """A following thread receives a change committed after it started, and returns promptly once stopped."""
    engine = make_engine(db_url, fakes, feed_poll_interval=0.02)
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    stopped = threading.Event()
    got: list[Change] = []

    def handler(change: Change) -> None:
        got.append(change)
        if change.new_vm_state == "stopped":
            stopped.set()

    with following(engine, "watcher", handler):
        engine.stop(uuid)
        assert stopped.wait(WAIT), "the follower never saw the stop"
    assert [c.new_task_state for c in got] == ["powering-off", None]
    engine.close()


def test_settings_refuse_bad_feed_values() -> None:
    """A poll interval under 0.01 s or a negative retention is InvalidInput."""
    for bad in ({"feed_poll_interval": 0.0}, {"feed_poll_interval": float("nan")}, {"change_retention": -1.0}):
        with pytest.raises(InvalidInput):
            Settings(**bad)  # type: ignore[arg-type]


def test_retention_keeps_what_a_consumer_has_not_passed(db_url: str, fakes: Fakes, clock: ManualClock) -> None:
    """Prune removes old changes up to the slowest consumer's position, keeps the rest and the newest, and 0 keeps all."""
    engine = make_engine(db_url, fakes, clock=clock)
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    engine.stop(uuid)
    engine.start(uuid)
    feed = engine.feed.changes(limit=10_000)
    engine.feed.follow("slow", lambda c: None, stop=STOPPED, batch=3)
    engine.feed.follow("fast", lambda c: None, stop=STOPPED, batch=10_000)
    clock.advance(60)
    assert engine.feed.prune() == 0  # change_retention 0: every change is kept
    assert engine.feed.prune(older_than=60.0) == 0  # written 60 s ago: not older than that
    assert engine.feed.prune(older_than=59.0) == 3
    assert engine.feed.changes(limit=10_000) == feed[3:]
    engine.feed.forget_consumer("slow")
    assert engine.feed.prune(older_than=59.0) == len(feed) - 4  # all the fast one passed, but the newest
    assert engine.feed.changes(limit=10_000) == feed[-1:]
    engine.close()


def test_a_pruned_log_never_hands_a_position_out_again(db_url: str, fakes: Fakes, clock: ManualClock) -> None:
    """After pruning all it may, the next change's position is above every earlier one (SQLite reuses no rowid)."""
    engine = make_engine(db_url, fakes, clock=clock)
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    written = engine.feed.changes(limit=10_000)
    newest = written[-1].position
    clock.advance(1)
    assert engine.feed.prune(older_than=0.5) >= len(written) - 1  # all but the newest (and any not yet readable)
    engine.stop(uuid)
    assert all(c.position > newest for c in engine.feed.changes(after=newest))
    assert len(engine.feed.changes(after=newest)) == 2
    engine.close()


def test_the_nova_format_uses_nova_names(engine: Engine, new_instance: Callable[..., str]) -> None:
    """--format nova renders instance.update with InstanceUpdatePayload and InstanceStateUpdatePayload field names."""
    uuid = new_instance()
    engine.stop(uuid, request_id="req-nova")
    last = engine.feed.changes(limit=10_000)[-1]
    note = nova_notification(last)
    assert (note["event_type"], note["priority"], note["publisher_id"]) == ("instance.update", "INFO", "lifecycle:h1")
    payload = note["payload"]
    assert (payload["nova_object.name"], payload["nova_object.namespace"]) == ("InstanceUpdatePayload", "nova")
    data = payload["nova_object.data"]
    assert {k: data[k] for k in ("uuid", "host", "state", "task_state", "power_state", "request_id")} == {
        "uuid": uuid,
        "host": "h1",
        "state": "stopped",
        "task_state": None,
        "power_state": "shutdown",
        "request_id": "req-nova",
    }
    assert data["state_update"]["nova_object.data"] == {
        "old_state": "active",
        "state": "stopped",
        "old_task_state": "powering-off",
        "new_task_state": None,
    }
    assert note["lifecycle"]["old_power_state"] == "running" and note["lifecycle"]["position"] == str(last.position)
    assert nova_notification(last)["message_id"] == note["message_id"]  # a redelivery can be recognised
    assert json.loads(json.dumps(note)) == note


# -- PostgreSQL: concurrent writers ------------------------------------------------------------------


@POSTGRES_ONLY
def test_a_change_committed_late_with_a_smaller_id_is_never_passed_over(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """A transaction holding an inserted audit row while later ones commit: readers wait for it, then get it first."""
    a, b = new_instance("a"), new_instance("b")
    start = engine.feed.changes(limit=10_000)[-1].position
    got: list[Change] = []
    with following(engine, "follower", got.append):
        held = engine.store.engine.connect()
        transaction = held.begin()
        instance = engine.get(a)
        audit(held, instance, instance, Why(actor="test", cause=Cause.API, message="held open"), always=True)
        engine.stop(b)  # two changes, committed after the held row took its id
        assert engine.feed.changes(after=start) == [] and engine.store.feed.held_back()
        transaction.commit()
        held.close()
        feed = engine.feed.changes(after=start)
        wait_until("the follower to get the three changes", lambda: len(got) >= 3)
    assert len(feed) == 3 and feed[0].message == "held open"
    assert feed[0].position.id < min(c.position.id for c in feed[1:]), "the held row has the smaller id"
    assert got == feed


@POSTGRES_ONLY
def test_an_instance_keeps_its_order_when_its_writer_took_an_older_transaction_id(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """A transaction that got its id before a stop committed, then wrote the instance, still comes after the stop."""
    uuid = new_instance()
    early = engine.store.engine.connect()
    transaction = early.begin()
    early_id = early.execute(sa.text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
    engine.stop(uuid)
    instance = engine.get(uuid)
    audit(early, instance, instance, Why(actor="test", cause=Cause.API, message="after the stop"), always=True)
    transaction.commit()
    early.close()
    mine = [c for c in engine.feed.changes(limit=10_000) if c.instance_uuid == uuid]
    assert [c.message for c in mine][-1] == "after the stop"
    assert mine[-1].position.tx > early_id, "the row took the stop's tx, not its own older id"
    assert [c.position.id for c in mine] == [e.id for e in engine.history(uuid)]


@POSTGRES_ONLY
def test_a_commit_wakes_a_follower_that_is_not_polling(db_url: str, fakes: Fakes) -> None:
    """With a 60 s poll interval, a change committed while the follower waits reaches it within seconds (NOTIFY)."""
    engine = make_engine(db_url, fakes, feed_poll_interval=60.0)
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    idle, stopped = threading.Event(), threading.Event()
    reader = engine.store.feed.reader

    @contextmanager
    def watched(claim: str | None = None) -> Iterator[Any]:
        with reader(claim) as inner:
            read = inner.read

            def read_and_tell(after: Position, limit: int) -> list[Change]:
                changes = read(after, limit)
                if not changes:
                    idle.set()  # the follower goes to wait next
                return changes

            inner.read = read_and_tell  # type: ignore[method-assign]
            yield inner

    engine.store.feed.reader = watched  # type: ignore[method-assign]
    with following(engine, None, lambda c: stopped.set() if c.new_vm_state == "stopped" else None):
        assert idle.wait(WAIT)
        engine.stop(uuid)
        assert stopped.wait(WAIT), "no wake-up: the follower would have slept 30 s"
    engine.close()


def _writer(url: str, uuids: list[str], seed: int, calls: int) -> int:
    """Fire random conflicting operations at the instances; return how many won."""
    import random

    from lifecycle import Conflict, InvalidState, Preempted

    rng, won = random.Random(seed), 0
    ops = ("stop", "start", "pause", "unpause", "suspend", "resume", "reboot", "reboot_hard", "rescue", "unrescue")
    with Engine(url, settings=Settings(shutdown_timeout=0), owner=f"writer-{seed}") as engine:
        for _ in range(calls):
            try:
                engine.run(rng.choice(ops), rng.choice(uuids))
                won += 1
            except (Conflict, InvalidState, Preempted):
                pass
    return won


def _follower(url: str, consumer: str, out: str, hang_after: int = 0) -> None:
    """Follow as ``consumer``, appending ``tx:id uuid`` per change to ``out`` (one write each), until SIGTERM.

    With ``hang_after``, the handler hangs after that many changes, inside a batch: a kill then lands
    after changes were handled but before their position was stored.
    """
    import os
    import signal

    stop, handled = threading.Event(), [0]
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def handler(change: Change) -> None:
        os.write(fd, f"{change.position} {change.instance_uuid}\n".encode())
        handled[0] += 1
        if handled[0] == hang_after:
            threading.Event().wait()

    with Engine(url, settings=Settings(feed_poll_interval=0.05)) as engine:
        engine.feed.follow(consumer, handler, stop=stop, batch=20)


def _lines(path: Path) -> list[str]:
    """The lines a follower process wrote so far (a kill may cut none: each is one write)."""
    return path.read_text().splitlines() if path.exists() else []


@POSTGRES_ONLY
@pytest.mark.slow
def test_followers_get_every_change_of_concurrent_writers_in_order_even_when_killed(
    db_url: str, tmp_path: Path
) -> None:
    """4 writer processes, 2 followers: each gets every committed row in feed order; one SIGKILLed mid-batch and restarted repeats only that batch's tail."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with Engine(db_url) as engine:
        engine.hosts.add("h1", f"fake://{tmp_path / 'h1.json'}")  # one hypervisor for every process
        engine.images.add("cirros", fake_image("cirros"))
        uuids = [engine.create(f"vm{i}", host="h1", flavor=FLAVOR, image="cirros").instance_uuid for i in range(12)]
        backlog = len(engine.feed.changes(limit=10_000))
    logs = {name: tmp_path / f"{name}.log" for name in ("steady", "killed")}
    hang_after = backlog + 45  # while the writers run, inside a batch of 20
    followers = {
        "steady": ctx.Process(target=_follower, args=(db_url, "steady", str(logs["steady"]))),
        "killed": ctx.Process(target=_follower, args=(db_url, "killed", str(logs["killed"]), hang_after)),
    }
    for process in followers.values():
        process.start()
    with ctx.Pool(4) as pool:
        writing = pool.starmap_async(_writer, [(db_url, uuids, seed, 80) for seed in range(4)])
        wait_until("the follower to hang mid-batch", lambda: len(_lines(logs["killed"])) >= hang_after, 120)
        followers["killed"].kill()
        followers["killed"].join()
        delivered_before_kill = len(_lines(logs["killed"]))
        followers["killed"] = ctx.Process(target=_follower, args=(db_url, "killed", str(logs["killed"])))
        followers["killed"].start()
        assert sum(writing.get(timeout=600)) > 0
    with Engine(db_url) as engine:
        check_invariants(engine.store)
        with engine.store.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT tx, id, instance_uuid FROM audit_log ORDER BY tx, id")).all()
        feed = [f"{tx}:{row_id} {uuid}" for tx, row_id, uuid in rows]
        histories = {uuid: [e.id for e in engine.history(uuid)] for uuid in uuids}
    wait_until("both followers to catch up", lambda: all(_lines(log)[-1:] == feed[-1:] for log in logs.values()), 120)
    for process in followers.values():
        process.terminate()
        process.join(WAIT)
        assert process.exitcode == 0
    assert _lines(logs["steady"]) == feed, "the steady follower missed, repeated or reordered a change"
    got = _lines(logs["killed"])
    first, second = got[:delivered_before_kill], got[delivered_before_kill:]
    assert delivered_before_kill == hang_after and first == feed[: len(first)]
    resumed_at = feed.index(second[0])
    assert resumed_at < len(first), "the kill cut a batch: its changes come again (at least once)"
    assert second == feed[resumed_at:], "after the restart: every change from the stored position on, in order"
    for uuid in uuids:
        ids = [int(line.split()[0].split(":")[1]) for line in feed if line.endswith(uuid)]
        assert ids == histories[uuid], "an instance's changes out of commit order"


def test_a_change_names_the_host_it_happened_on(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A migrated instance's changes name the source host until the move, the destination after it."""
    uuid = new_instance()
    engine.migrate(uuid, host="h2")
    engine.confirm_resize(uuid)
    hosts = [c.host for c in engine.feed.changes(limit=10_000) if c.instance_uuid == uuid]
    assert hosts[0] is None and hosts[-1] == "h2" and "h1" in hosts
    assert hosts.index("h2") > max(i for i, h in enumerate(hosts) if h == "h1")
