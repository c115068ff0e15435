"""The injectable clock: the test clock itself, and the engine's times, leases, duties and timers following it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from lifecycle import Engine
from lifecycle.clock import ManualClock, SystemClock
from lifecycle.drivers.fake import SimulatedCrash
from lifecycle.host_worker import Job
from lifecycle.host_worker import run_jobs as _loop
from lifecycle.states import VmState
from tests.conftest import FLAVOR, Fakes, holds_for, make_engine, wait_until

START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_a_manual_clock_moves_only_when_told() -> None:
    """now() stands still; advance() moves now() and monotonic(); set() moves now() only, either way."""
    clock = ManualClock(START)
    assert clock.now() == clock.now() == START and clock.monotonic() == 0.0
    assert clock.advance(90) == START + timedelta(seconds=90) == clock.now()
    assert clock.monotonic() == 90.0
    clock.set(START - timedelta(days=1))
    assert clock.now() == START - timedelta(days=1) and clock.monotonic() == 90.0


def test_a_manual_clock_refuses_naive_times_and_going_back() -> None:
    """A naive start or moment, and a negative advance, are refused: the clock's times are aware UTC."""
    with pytest.raises(ValueError, match="timezone-aware"):
        ManualClock(datetime(2030, 1, 1))  # naive on purpose
    with pytest.raises(ValueError, match="timezone-aware"):
        ManualClock().set(datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="zero seconds or more"):
        ManualClock().advance(-1)


def test_the_system_clock_is_aware_utc() -> None:
    """SystemClock gives the real time in UTC, and a waited event that is set returns at once."""
    clock, event = SystemClock(), threading.Event()
    assert abs(clock.now() - datetime.now(UTC)) < timedelta(seconds=5) and clock.now().tzinfo is UTC
    event.set()
    assert clock.wait(event, 3600) is True


def test_a_wait_on_a_manual_clock_ends_when_the_clock_is_advanced_far_enough() -> None:
    """wait() outlasts an advance short of its seconds and ends at the one that reaches them, with the event unset."""
    clock, event, ended = ManualClock(START), threading.Event(), threading.Event()
    waiter = threading.Thread(target=lambda: ended.set() if clock.wait(event, 60) is False else None)
    waiter.start()
    wait_until("the waiter asleep", lambda: clock.waiting == 1)
    clock.advance(59)
    holds_for("the wait going on a second short", lambda: waiter.is_alive() and not ended.is_set(), 0.2)
    clock.advance(1)
    waiter.join(10)
    assert ended.is_set() and clock.waiting == 0


def test_store_writes_are_stamped_with_the_engine_clock(engine: Engine, clock: ManualClock) -> None:
    """Audit rows, a task's start, end and lease, and a heartbeat carry the engine's clock time, not the real time."""
    clock.set(START)
    engine.hosts.heartbeat("h1")
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    assert engine.hosts.get("h1").last_heartbeat == START
    assert {entry.created_at for entry in engine.history(uuid)} == {START}
    [task] = engine.tasks(uuid)
    assert task.started_at == task.finished_at == task.lease_expires_at == START  # a finished task's lease ends then


def test_a_lease_expires_once_the_clock_passes_it_and_not_before(sqlite_url: str, fakes: Fakes) -> None:
    """A crashed owner's task is left alone while its lease runs, and recovered by another engine once past it."""
    clock = ManualClock()
    crashed = make_engine(sqlite_url, fakes, clock=clock, lease_seconds=60.0, heartbeat_seconds=3600.0)
    uuid = crashed.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    fakes["h1"].faults.crash_after("pause")
    with pytest.raises(SimulatedCrash):
        crashed.pause(uuid)
    other = make_engine(sqlite_url, fakes, clock=clock)
    clock.advance(59)
    assert other.recover() == [] and other.store.tasks.worker_alive(crashed.get(uuid).task_id or "")
    clock.advance(2)
    assert [r.outcome for r in other.recover()] == ["succeeded"]
    assert other.get(uuid).vm_state is VmState.PAUSED
    crashed.close()
    other.close()


def test_the_confirm_window_confirms_a_resize_only_once_the_clock_passes_it(db_url: str, fakes: Fakes) -> None:
    """A finished move is left for the operator until resize_confirm_window has passed on the clock, then confirmed."""
    clock = ManualClock()
    engine = make_engine(db_url, fakes, clock=clock, shutdown_timeout=0.0, resize_confirm_window=3600.0)
    try:
        for host in ("h1", "h2"):
            engine.hosts.heartbeat(host)
        uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
        engine.migrate(uuid)
        assert engine.get(uuid).vm_state is VmState.RESIZED
        clock.advance(3599)
        assert engine.duties.poll_unconfirmed_resizes() == [] and engine.get(uuid).vm_state is VmState.RESIZED
        clock.advance(2)
        assert [r.outcome for r in engine.duties.poll_unconfirmed_resizes()] == ["done"]
        assert engine.get(uuid).vm_state is VmState.ACTIVE
    finally:
        engine.close()


def test_reclaim_deletes_a_soft_deleted_instance_only_once_the_clock_passes_the_interval(
    db_url: str, fakes: Fakes
) -> None:
    """With reclaim_instance_interval 1 h a soft delete stays restorable until the clock is an hour on, then goes."""
    clock = ManualClock()
    engine = make_engine(db_url, fakes, clock=clock, shutdown_timeout=0.0, reclaim_instance_interval=3600.0)
    try:
        uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
        engine.delete(uuid)
        clock.advance(3599)
        assert engine.duties.reclaim_queued_deletes() == [] and engine.get(uuid).vm_state is VmState.SOFT_DELETED
        clock.advance(2)
        [result] = engine.duties.reclaim_queued_deletes()
        assert (result.uuid, result.outcome) == (uuid, "deleted") and engine.get(uuid).vm_state is VmState.DELETED
    finally:
        engine.close()


def test_daemon_jobs_run_when_the_clock_reaches_their_turn() -> None:
    """A daemon job loop on a manual clock runs a job at start, then again only each time its interval is advanced."""
    clock, stop, runs = ManualClock(START), threading.Event(), []
    loop = threading.Thread(
        target=_loop, args=([Job("count", 60.0, lambda: runs.append(clock.monotonic()))], stop, clock)
    )
    loop.start()
    try:
        wait_until("the job's first run, then the loop asleep", lambda: runs == [0.0] and clock.waiting == 1)
        clock.advance(59)
        holds_for("no second run a second before its turn", lambda: runs == [0.0], 0.2)
        clock.advance(1)
        wait_until("the job's second run, a minute on", lambda: runs == [0.0, 60.0])
        assert runs == [0.0, 60.0]
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()
