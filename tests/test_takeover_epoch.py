"""Takeover by epoch: recovery takes a task with a compare-and-swap on the epoch it read.

Two recoveries that read a running task at the same epoch (two ``lifecycle
recover --owner X --force`` processes at once, say) must not both take it:
each would run the task's steps, and two runs of one task delete each
other's disk volume on the hypervisor. A read made stale by a takeover since
(the epoch moved on) must take nothing, even when the lease has run out again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import wraps
from typing import Any

import pytest

from lifecycle import Engine, Outcome, Settings, VmState
from lifecycle.drivers.fake import SimulatedCrash
from lifecycle.records import Task
from lifecycle.store import Store
from tests.conftest import FLAVOR, Fakes, make_engine
from tests.invariants import check_invariants

V = VmState


def _twin(db_url: str, fakes: Fakes, owner: str, **settings: float) -> Engine:
    """Another engine over the same database and fake hosts, under ``owner`` (another process, same name)."""
    return Engine(
        db_url,
        driver_factory=fakes.factory,
        owner=owner,
        settings=Settings(**{"shutdown_timeout": 0.0, **settings}),  # type: ignore[arg-type]
    )


def _meet_after(store: object, method: str, barrier: threading.Barrier) -> None:
    """Make ``store.method`` wait at ``barrier`` once it has returned (so both racers pass the same point)."""
    original = getattr(store, method)

    @wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        barrier.wait()
        return result

    setattr(store, method, wrapper)


@contextmanager
def _held_pause(engine: Engine, fakes: Fakes) -> Iterator[tuple[str, Task]]:
    """Start a pause whose driver call is held (its worker alive, its lease live); release it on exit."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    gate = fakes["h1"].faults.hold("pause")
    task = engine.pause(uuid, wait=False)
    assert gate.wait_entered()
    try:
        yield uuid, task
    finally:
        gate.release()
        engine.runner.wait_idle()


def test_one_of_two_takeovers_at_the_same_epoch_wins_even_forced_under_one_owner(engine: Engine, fakes: Fakes) -> None:
    """Two concurrent take_overs of one read, forced under the same owner name, give exactly one winner."""
    with _held_pause(engine, fakes) as (uuid, task):
        [read] = engine.store.tasks.recoverable(engine.owner, force=True)
        assert (read.id, read.epoch, read.owner) == (task.id, 0, engine.owner)
        stores = [Store(engine.store.url), Store(engine.store.url)]  # two recovering processes
        start = threading.Barrier(2, timeout=10)

        def take(store: Store) -> Task | None:
            start.wait()
            return store.tasks.take_over(read, engine.owner, force=True)

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(take, stores))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, results
        [won] = winners
        assert (won.id, won.epoch, won.owner, won.outcome) == (task.id, 1, engine.owner, Outcome.RUNNING)
        assert engine.store.tasks.get(task.id) == won  # what take_over returns is the row as it now stands
        for store in stores:  # and the loser's read, now stale, still takes nothing
            assert store.tasks.take_over(read, engine.owner, force=True) is None
            store.close()
    assert engine.task(task.id).epoch == 1  # the fenced worker's late write changed nothing
    assert [r.outcome for r in engine.recover(force=True)] == ["succeeded"]
    assert engine.get(uuid).vm_state is V.PAUSED


def test_two_forced_recoveries_under_one_owner_run_a_held_task_once(db_url: str, engine: Engine, fakes: Fakes) -> None:
    """Two recover(force=True) racing under one owner on a task held in a driver call run its steps exactly once."""
    with _held_pause(engine, fakes) as (uuid, task):
        twins = [_twin(db_url, fakes, engine.owner) for _ in range(2)]
        read_both = threading.Barrier(2, timeout=10)  # both read the task before either takes it ...
        took_both = threading.Barrier(2, timeout=10)  # ... and both tried to take it before either runs it
        for twin in twins:
            _meet_after(twin.store.tasks, "recoverable", read_both)
            _meet_after(twin.store.tasks, "take_over", took_both)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda twin: twin.recover(force=True), twins))
        assert fakes["h1"].calls.count("pause") == 2  # the held call and one resumed run, never two
        assert sorted(len(r) for r in results) == [0, 1], results
        [recovered] = [r for rs in results for r in rs]
        assert (recovered.task_id, recovered.outcome) == (task.id, "succeeded")
        for twin in twins:
            twin.close()
    assert engine.task(task.id).outcome is Outcome.SUCCEEDED and engine.task(task.id).epoch == 1
    assert engine.get(uuid).vm_state is V.PAUSED and fakes["h1"].calls.count("pause") == 2


def test_a_stale_read_takes_nothing_even_once_the_lease_ran_out_again(db_url: str, fakes: Fakes) -> None:
    """A take_over of a read whose epoch has moved since takes nothing, with or without force, though the lease ran out."""
    crashed = make_engine(db_url, fakes, lease_seconds=0.0, heartbeat_seconds=3600.0, shutdown_timeout=0.0)
    uuid = crashed.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    fakes["h1"].faults.crash_after("pause")
    with pytest.raises(SimulatedCrash):
        crashed.pause(uuid)
    [stale] = crashed.store.tasks.recoverable("recoverer-a")  # lease 0 s: expired, anyone's to take
    taken = crashed.store.tasks.take_over(stale, "recoverer-a")
    assert taken is not None and taken.epoch == stale.epoch + 1
    # Its lease (0 s) has run out already: only the epoch now tells the stale read from a fresh one.
    assert crashed.store.tasks.recoverable("recoverer-b") == [taken]
    assert crashed.store.tasks.take_over(stale, "recoverer-b") is None
    assert crashed.store.tasks.take_over(stale, "recoverer-a", force=True) is None
    assert crashed.store.tasks.get(stale.id) == taken
    assert crashed.store.tasks.take_over(taken, "recoverer-b") is not None  # the fresh read still takes it
    crashed.close()


def test_a_recovery_whose_read_went_stale_runs_nothing(db_url: str, fakes: Fakes) -> None:
    """A recovery that read a task before another takeover moved its epoch neither takes nor runs it."""
    crashed = make_engine(db_url, fakes, lease_seconds=0.0, heartbeat_seconds=3600.0, shutdown_timeout=0.0)
    uuid = crashed.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    fakes["h1"].faults.crash_after("pause")
    with pytest.raises(SimulatedCrash):
        crashed.pause(uuid)
    late = _twin(db_url, fakes, "late", lease_seconds=0.0)
    read = late.store.tasks.recoverable

    def read_then_lose_the_race(owner: str, *, force: bool = False) -> list[Task]:
        tasks = read(owner, force=force)
        for task in tasks:  # another recovery takes it meanwhile; its 0 s lease runs out at once
            assert crashed.store.tasks.take_over(task, "other") is not None
        return tasks

    late.store.tasks.recoverable = read_then_lose_the_race  # type: ignore[method-assign]
    pauses = fakes["h1"].calls.count("pause")
    assert late.recover() == []
    assert fakes["h1"].calls.count("pause") == pauses
    assert crashed.store.tasks.get(crashed.get(uuid).task_id or "").owner == "other"
    late.close()
    survivor = _twin(db_url, fakes, "survivor")
    assert [r.outcome for r in survivor.recover()] == ["succeeded"]
    assert survivor.get(uuid).vm_state is V.PAUSED
    check_invariants(survivor.store)
    survivor.close()
    crashed.close()
