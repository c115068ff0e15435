"""A database that goes away under a follower: waited for, reconnected to, nothing lost, nothing repeated.

The first tests inject the store's own error (:class:`DatabaseUnavailable`)
into a follower's reader on both databases; the PostgreSQL ones kill the
follower's server sessions for real (``pg_terminate_backend``, this test's
own database only). ``tests/test_feed_restart.py`` restarts a whole server.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

import lifecycle.feed as feed
from lifecycle import Change, Engine
from lifecycle.errors import DatabaseUnavailable
from lifecycle.store._follower import unavailable
from tests.conftest import FLAVOR, Fakes, all_logs, make_engine, wait_until
from tests.test_feed import POSTGRES_ONLY, STOPPED, WAIT

LOST = "consuming input failed: server closed the connection unexpectedly"


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reconnect after 10 ms, then 20 ms at most: the backoff's shape, at a test's pace."""
    monkeypatch.setattr(feed, "RECONNECT_FIRST", 0.01)
    monkeypatch.setattr(feed, "RECONNECT_MAX", 0.02)


class Outage:
    """Scripted faults for a store's readers: which read calls fail, then how many reconnects fail after each."""

    def __init__(self, engine: Engine, fail_reads: set[int], down_for: int, transient: bool = True) -> None:
        self.fail_reads, self.down_for, self.transient = fail_reads, down_for, transient
        self.reads = self.entries = self.refused = 0
        self.down = 0
        self._reader = engine.store.feed.reader
        engine.store.feed.reader = self.reader  # type: ignore[method-assign]

    def _fault(self) -> DatabaseUnavailable:
        return DatabaseUnavailable(LOST, transient=self.transient)

    @contextmanager
    def reader(self, claim: str | None = None) -> Iterator[Any]:
        self.entries += 1
        if self.down:
            self.down -= 1
            self.refused += 1
            raise self._fault()
        with self._reader(claim) as inner:
            read = inner.read

            def flaky(after: Any, limit: int) -> list[Change]:
                self.reads += 1
                if self.reads in self.fail_reads:
                    self.down = self.down_for
                    raise self._fault()
                return read(after, limit)

            inner.read = flaky
            yield inner


def _busy(engine: Engine) -> list[Change]:
    """Commit a few instances' worth of changes; return the whole feed."""
    for name in ("a", "b"):
        uuid = engine.create(name, host="h1", flavor=FLAVOR, image="cirros").instance_uuid
        engine.stop(uuid)
        engine.start(uuid)
    return engine.feed.changes(limit=10_000)


def _follow_all(engine: Engine, consumer: str | None, last: Change, **kw: Any) -> list[Change]:
    """Follow (batches of 3) until ``last`` arrives; a follow still running after WAIT is stopped and fails the test."""
    got: list[Change] = []
    stop = threading.Event()
    guard = threading.Timer(WAIT, stop.set)
    guard.start()

    def handler(change: Change) -> None:
        got.append(change)
        if change.position == last.position:
            stop.set()

    try:
        engine.feed.follow(consumer, handler, stop=stop, batch=3, **kw)
    finally:
        guard.cancel()
    assert got and got[-1] == last, "the follow was stopped before the last change arrived"
    return got


@pytest.mark.parametrize("consumer", ["billing", None])
def test_a_follower_rides_out_a_lost_database_and_loses_nothing(engine: Engine, consumer: str | None) -> None:
    """A read failing twice mid-stream, each followed by two failed reconnects: every change arrives once, in order, with warnings carrying the database's message and a doubling wait."""
    changes = _busy(engine)
    outage = Outage(engine, fail_reads={2, 4}, down_for=2)
    with all_logs() as logs:
        got = _follow_all(engine, consumer, changes[-1])
    assert got == changes, "a change lost, repeated or out of order across the outages"
    assert (outage.refused, outage.entries) == (4, 7)
    lost = [e for e in logs if e["event"] == "feed_database_lost"]
    assert [e["error"] for e in lost] == [LOST] * 6
    assert [e["retry_in"] for e in lost] == [0.01, 0.02, 0.02] * 2
    assert [e["position"] for e in lost[:3]] == [str(changes[2].position)] * 3
    assert len([e for e in logs if e["event"] == "feed_database_back"]) == 2
    if consumer is not None:
        (stored,) = engine.feed.consumers()
        assert stored.position == changes[-1].position


@pytest.mark.parametrize("consumer", ["billing", None])
def test_told_to_stop_while_the_database_is_away_is_a_typed_error_saying_where_to_resume(
    engine: Engine, consumer: str | None
) -> None:
    """A stop while every reconnect fails ends the follow with DatabaseUnavailable naming the database's message and the position to resume from."""
    changes = _busy(engine)
    Outage(engine, fail_reads={2}, down_for=10**6)
    stop = threading.Event()
    got: list[Change] = []
    with all_logs() as logs:

        def stop_once_three_reconnects_failed() -> None:
            try:
                wait_until(
                    "three failed reconnects", lambda: sum(e["event"] == "feed_database_lost" for e in logs) >= 3
                )
            finally:
                stop.set()

        threading.Thread(target=stop_once_three_reconnects_failed, daemon=True).start()
        with pytest.raises(DatabaseUnavailable) as caught:
            engine.feed.follow(consumer, got.append, stop=stop, batch=3)
    assert got == changes[:3]
    error = caught.value
    assert error.transient and error.reason == LOST and LOST in str(error)
    assert str(error).startswith("stopped while the database was unreachable")
    # nothing was stored before the database went (a page of 3 is not yet a save), and nothing can be now
    resume = f"--after {changes[2].position}" if consumer is None else "its stored position 0:0"
    assert resume in str(error)
    assert len([e for e in logs if e["event"] == "feed_database_lost"]) >= 3


def test_an_error_a_reconnect_cannot_cure_ends_the_follow_at_once(engine: Engine) -> None:
    """A non-transient database error is raised at the first occurrence, with the position of what was delivered stored."""
    changes = _busy(engine)
    outage = Outage(engine, fail_reads={2}, down_for=0, transient=False)
    with pytest.raises(DatabaseUnavailable, match="the database cannot be used: " + LOST):
        engine.feed.follow("billing", lambda c: None, stop=threading.Event(), batch=3)
    assert outage.entries == 1
    (stored,) = engine.feed.consumers()
    assert stored.position == changes[2].position


def test_a_missing_table_is_a_typed_error_in_sqlites_words(db_url: str, engine: Engine) -> None:
    """A follower whose consumer table is gone gets DatabaseUnavailable (not transient) with the database's own message."""
    _busy(engine)
    with engine.store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE feed_consumers"))
    with pytest.raises(DatabaseUnavailable) as caught:
        engine.feed.follow("billing", lambda c: None, stop=STOPPED)
    assert not caught.value.transient and "feed_consumers" in caught.value.reason


@pytest.mark.parametrize(
    ("dialect_url", "error", "transient"),
    [
        ("sqlite://", sqlite3.OperationalError("database is locked"), True),
        ("sqlite://", sqlite3.OperationalError("no such table: audit_log"), False),
        ("sqlite://", sqlite3.IntegrityError("UNIQUE constraint failed"), False),
        ("postgresql+psycopg://u@127.0.0.1:1/x", "OperationalError", True),
        ("postgresql+psycopg://u@127.0.0.1:1/x", "ProgrammingError", False),
    ],
)
def test_the_store_maps_driver_errors_to_transient_or_not(dialect_url: str, error: Any, transient: bool) -> None:
    """Errors off a DBAPI cursor: PostgreSQL's OperationalError and SQLite's locked file are transient; others are not."""
    engine = sa.create_engine(dialect_url)
    if isinstance(error, str):
        psycopg = pytest.importorskip("psycopg")
        error = getattr(psycopg, error)("server closed the connection unexpectedly\n\tThis probably means...")
    with pytest.raises(DatabaseUnavailable) as caught, unavailable(engine.dialect):
        raise error
    assert caught.value.transient is transient and "\n" not in caught.value.reason
    engine.dispose()


# -- PostgreSQL: sessions killed for real -------------------------------------------------------------


def kill_other_sessions(engine: Engine) -> int:
    """Terminate every other session on this test's own database (the follower's, the pool's); return how many."""
    with engine.store.engine.connect() as conn:
        killed = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
        conn.commit()
    return int(killed)


@contextmanager
def _following(engine: Engine, got: list[Change], errors: list[BaseException]) -> Iterator[threading.Event]:
    stop = threading.Event()

    def run() -> None:
        try:
            engine.feed.follow("watcher", got.append, stop=stop, after="end")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(WAIT)
        assert not thread.is_alive()


@POSTGRES_ONLY
def test_a_killed_session_is_reconnected_and_listened_on_again(db_url: str, fakes: Fakes) -> None:
    """After pg_terminate_backend of its session, a follower reconnects, LISTENs again (a commit wakes it long before IDLE_RECHECK), and loses nothing."""
    engine = make_engine(db_url, fakes, feed_poll_interval=60.0)
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    got: list[Change] = []
    errors: list[BaseException] = []
    with all_logs() as logs, _following(engine, got, errors):
        wait_until("the follower registered", lambda: bool(engine.feed.consumers()))
        engine.stop(uuid)
        wait_until("the stop followed", lambda: any(c.new_vm_state == "stopped" for c in got))
        assert kill_other_sessions(engine) >= 1
        wait_until("the follower back", lambda: any(e["event"] == "feed_database_back" for e in logs))
        engine.start(uuid)
        wait_until("the start followed, woken by its NOTIFY", lambda: any(c.new_vm_state == "active" for c in got[2:]))
    assert errors == []
    mine = [c for c in engine.feed.changes(limit=10_000) if c.instance_uuid == uuid]
    assert got == mine[-4:], "a change lost or repeated across the killed session"
    lost = next(e for e in logs if e["event"] == "feed_database_lost")
    assert "terminat" in lost["error"] or "closed" in lost["error"], lost
    engine.close()
