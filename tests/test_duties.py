"""Operator duties on fake hosts: reclaim, build timeout, reset-state, lock and unlock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest

from lifecycle import Engine, Flavor, Settings
from lifecycle.clock import Clock, ManualClock
from lifecycle.errors import Fenced, InstanceLocked, InvalidInput, InvalidState, Preempted
from lifecycle.records import Cause, Outcome
from lifecycle.states import TaskState, VmState
from tests.conftest import Fakes
from tests.images import fake_image
from tests.invariants import check_invariants

V = VmState
SMALL = Flavor(1, 256, 1)


def _cloud(db_url: str, fakes: Fakes, clock: Clock | None = None, **settings: float) -> Engine:
    engine = Engine(
        db_url, driver_factory=fakes.factory, settings=Settings(shutdown_timeout=0, **settings), clock=clock
    )
    engine.hosts.add("a", "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
    engine.hosts.heartbeat("a")
    engine.images.add("cirros", fake_image("cirros"))
    return engine


@pytest.fixture
def cloud(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """One fake host; no duty settings."""
    engine = _cloud(db_url, fakes)
    yield engine
    check_invariants(engine.store)
    engine.close()


@pytest.fixture
def reclaiming(db_url: str, fakes: Fakes, clock: ManualClock) -> Iterator[Engine]:
    """One fake host on the test's clock; soft delete kept an hour before reclaim."""
    engine = _cloud(db_url, fakes, clock, reclaim_instance_interval=3600.0)
    yield engine
    check_invariants(engine.store)
    engine.close()


def _vm(engine: Engine) -> str:
    return engine.create("vm", host="a", flavor=SMALL, image="cirros").instance_uuid


def test_with_reclaim_on_delete_is_a_soft_delete_restorable_until_reclaimed(
    reclaiming: Engine, fakes: Fakes, clock: ManualClock
) -> None:
    """delete soft-deletes (guest off, kept); restore brings it back; reclaim does nothing before the interval."""
    uuid = _vm(reclaiming)
    reclaiming.delete(uuid)
    assert reclaiming.get(uuid).vm_state is V.SOFT_DELETED and fakes["a"].domain_exists(uuid)
    clock.advance(3599)
    assert reclaiming.duties.reclaim_queued_deletes() == []  # a second short of the hour
    reclaiming.restore(uuid)
    assert reclaiming.get(uuid).vm_state is V.ACTIVE
    assert reclaiming.duties.reclaim_queued_deletes(interval=0) == []  # restored: nothing queued, however old


def test_reclaim_deletes_for_good_after_the_interval(reclaiming: Engine, fakes: Fakes, clock: ManualClock) -> None:
    """Past the interval the duty runs a delete (cause timer): instance deleted, domain and claim gone, audited."""
    uuid = _vm(reclaiming)
    reclaiming.delete(uuid)
    clock.advance(3601)
    [result] = reclaiming.duties.reclaim_queued_deletes()
    assert (result.uuid, result.outcome) == (uuid, "deleted")
    assert reclaiming.get(uuid).vm_state is V.DELETED and not fakes["a"].domain_exists(uuid)
    assert reclaiming.store.claims.of(uuid) == []
    last = reclaiming.history(uuid)[-1]
    assert (last.cause, last.actor, last.operation) == (Cause.TIMER, "timer:reclaim", "delete")


def test_without_reclaim_delete_deletes_at_once(cloud: Engine) -> None:
    """With reclaim_instance_interval 0 (the default) delete is a delete, and the duty does nothing."""
    uuid = _vm(cloud)
    cloud.delete(uuid)
    assert cloud.get(uuid).vm_state is V.DELETED
    assert cloud.duties.reclaim_queued_deletes() == []


def test_a_build_stuck_in_the_driver_times_out_and_its_worker_is_fenced(
    db_url: str, fakes: Fakes, clock: ManualClock
) -> None:
    """A spawn held past instance_build_timeout: the instance goes to error, the task fails, the worker stops."""
    engine = _cloud(db_url, fakes, clock, instance_build_timeout=600.0)
    try:
        gate = fakes.factory(engine.hosts.get("a")).faults.hold("spawn")
        errors: list[BaseException] = []

        def build() -> None:
            try:
                engine.create(
                    "slow", host="a", flavor=SMALL, image="cirros", uuid="6f1c0f4e-8d0b-4f8e-9a55-1b5a2f6c9d01"
                )
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=build)
        worker.start()
        assert gate.wait_entered()
        uuid = "6f1c0f4e-8d0b-4f8e-9a55-1b5a2f6c9d01"
        clock.advance(599)
        assert engine.duties.check_build_timeouts() == []  # a second short of the timeout
        clock.advance(2)
        [result] = engine.duties.check_build_timeouts()
        assert (result.uuid, result.outcome) == (uuid, "timed_out")
        i = engine.get(uuid)
        assert (i.vm_state, i.task_state, i.task_id) == (V.ERROR, None, None)
        [task] = engine.tasks(uuid)
        assert task.outcome is Outcome.FAILED and "instance_build_timeout" in (task.error or "")
        last = engine.history(uuid)[-1]
        assert (last.cause, last.actor, last.to_vm_state) == (Cause.TIMER, "timer:build_timeout", V.ERROR)
        gate.release()
        worker.join(10)
        assert len(errors) == 1 and isinstance(errors[0], Fenced | Preempted)
        assert engine.get(uuid).vm_state is V.ERROR  # the woken worker wrote nothing
    finally:
        engine.close()


def test_reset_state_ends_a_stuck_task_and_the_next_operation_runs(cloud: Engine, fakes: Fakes) -> None:
    """reset-state of a stop stuck in the driver: task failed (cause admin, who and why), task_state cleared, stop again works."""
    uuid = _vm(cloud)
    gate = fakes["a"].faults.hold("power_off")

    errors: list[BaseException] = []

    def stop() -> None:
        try:
            cloud.stop(uuid)
        except BaseException as exc:
            errors.append(exc)

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert gate.wait_entered()
    assert cloud.get(uuid).task_state is TaskState.POWERING_OFF
    i = cloud.reset_state(uuid, reason="stop hung in libvirt, ticket 42", actor="alice")
    assert (i.vm_state, i.task_state) == (V.ERROR, None)
    stuck = cloud.tasks(uuid)[-1]
    assert stuck.outcome is Outcome.FAILED and "alice" in (stuck.error or "") and "ticket 42" in (stuck.error or "")
    last = cloud.history(uuid)[-1]
    assert (last.cause, last.actor, last.operation, last.message) == (
        Cause.ADMIN,
        "alice",
        "reset_state",
        "stop hung in libvirt, ticket 42",
    )
    gate.release()
    stopper.join(10)
    assert len(errors) == 1 and isinstance(errors[0], Fenced)  # the woken worker found its task ended
    assert cloud.get(uuid).vm_state is V.ERROR  # and wrote nothing
    cloud.reset_state(uuid, state=V.ACTIVE, reason="checked by hand")
    assert cloud.get(uuid).vm_state is V.ACTIVE
    cloud.stop(uuid)
    assert cloud.get(uuid).vm_state is V.STOPPED


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reason": ""}, "a reason is required"),
        ({"reason": "   "}, "a reason is required"),
        ({"reason": "x", "state": V.STOPPED}, "reset-state sets vm_state"),
        ({"reason": "two\nlines"}, "one line"),
    ],
)
def test_reset_state_refuses_bad_input_and_changes_nothing(
    cloud: Engine, kwargs: dict[str, object], message: str
) -> None:
    """A missing reason or a vm_state other than error/active is refused before anything is written."""
    uuid = _vm(cloud)
    before = cloud.get(uuid)
    with pytest.raises(InvalidInput, match=message):
        cloud.reset_state(uuid, **kwargs)  # type: ignore[arg-type]
    assert cloud.get(uuid) == before and len(cloud.history(uuid)) == len(cloud.history(uuid))


def test_a_locked_instance_refuses_operations_but_reads_and_an_override_passes(cloud: Engine) -> None:
    """Lock refuses stop naming who, when and why; reads work; override_lock passes; sync is not blocked."""
    uuid = _vm(cloud)
    locked = cloud.lock(uuid, reason="legal hold", actor="bob")
    assert (locked.locked_by, locked.locked_reason) == ("bob", "legal hold") and locked.locked_at is not None
    with pytest.raises(InstanceLocked, match=r"locked by bob at .*legal hold"):
        cloud.stop(uuid)
    with pytest.raises(InstanceLocked):
        cloud.delete(uuid)
    assert cloud.get(uuid).vm_state is V.ACTIVE and cloud.history(uuid)[-1].message == "locked: legal hold"
    cloud.stop(uuid, override_lock=True, actor="admin-carol")
    assert cloud.get(uuid).vm_state is V.STOPPED and cloud.get(uuid).locked_by == "bob"
    started = next(h for h in cloud.history(uuid) if h.operation == "stop")
    assert started.actor == "admin-carol" and "overrides the lock of bob (legal hold)" in (started.message or "")
    cloud.run("start", uuid, actor="sync", cause=Cause.SYNC)  # sync and timers are never blocked by a lock
    assert cloud.get(uuid).vm_state is V.ACTIVE


def test_only_the_locker_or_an_override_unlocks(cloud: Engine) -> None:
    """Another actor cannot unlock; the locker can; an admin override can; locking twice is refused."""
    uuid = _vm(cloud)
    cloud.lock(uuid, reason="maintenance", actor="bob")
    with pytest.raises(InstanceLocked):
        cloud.lock(uuid, reason="again", actor="eve")
    with pytest.raises(InstanceLocked):
        cloud.unlock(uuid, actor="eve")
    assert cloud.unlock(uuid, actor="bob").locked_by is None
    cloud.lock(uuid, reason="maintenance", actor="bob")
    unlocked = cloud.unlock(uuid, actor="admin-carol", override_lock=True)
    assert unlocked.locked_by is None and cloud.history(uuid)[-1].cause == Cause.ADMIN
    cloud.stop(uuid)
    assert cloud.get(uuid).vm_state is V.STOPPED


def test_a_lock_taken_while_an_operation_runs_lets_it_finish(cloud: Engine, fakes: Fakes) -> None:
    """Locking during a stop held in the driver changes only the lock: the stop ends as it would."""
    uuid = _vm(cloud)
    gate = fakes["a"].faults.hold("power_off")
    worker = threading.Thread(target=cloud.stop, args=(uuid,))
    worker.start()
    assert gate.wait_entered()
    cloud.lock(uuid, reason="freeze", actor="bob")
    gate.release()
    worker.join(10)
    i = cloud.get(uuid)
    assert (i.vm_state, i.task_state, i.locked_by) == (V.STOPPED, None, "bob")
    assert cloud.tasks(uuid)[-1].outcome is Outcome.SUCCEEDED


def test_two_lockers_cannot_both_win(cloud: Engine) -> None:
    """A lock written from a stale read of an unlocked instance is a Conflict once another lock is in."""
    from lifecycle.audit import Why
    from lifecycle.errors import Conflict

    uuid = _vm(cloud)
    stale = cloud.get(uuid)
    cloud.lock(uuid, reason="first", actor="bob")
    with pytest.raises(Conflict):
        cloud.store.writes.set_lock(stale, "eve", "second", Why(actor="eve", cause=Cause.API, operation="lock"))
    assert cloud.get(uuid).locked_by == "bob"


def test_a_locked_instance_refuses_through_the_state_guard_order(cloud: Engine) -> None:
    """A lock is reported before the state guard: a locked stopped instance refuses stop as locked, not as invalid."""
    uuid = _vm(cloud)
    cloud.stop(uuid)
    cloud.lock(uuid, reason="r", actor="bob")
    with pytest.raises(InstanceLocked):
        cloud.stop(uuid)
    cloud.unlock(uuid, actor="bob")
    with pytest.raises(InvalidState):
        cloud.stop(uuid)


def test_reclaim_never_takes_over_a_restore_in_flight(reclaiming: Engine, fakes: Fakes) -> None:
    """A restore held in the driver when the reclaim runs is skipped, not preempted: the guest comes back."""
    uuid = _vm(reclaiming)
    reclaiming.delete(uuid)
    queue = reclaiming.store.instances.in_state_since(
        V.SOFT_DELETED, reclaiming.get(uuid).updated_at + timedelta(seconds=1)
    )
    assert [i.uuid for i in queue] == [uuid]
    gate = fakes["a"].faults.hold("power_on")
    worker = threading.Thread(target=reclaiming.restore, args=(uuid,))
    worker.start()
    assert gate.wait_entered()
    # The duty read its queue just before the restore began: it acts on that read.
    reclaiming.store.instances.in_state_since = lambda *_args: queue  # type: ignore[method-assign]
    [result] = reclaiming.duties.reclaim_queued_deletes()
    assert (result.uuid, result.outcome) == (uuid, "skipped")
    gate.release()
    worker.join(10)
    assert reclaiming.get(uuid).vm_state is V.ACTIVE and fakes["a"].domain_exists(uuid)


def test_reset_state_refuses_an_instance_with_an_open_move(db_url: str, fakes: Fakes) -> None:
    """A resized instance (move open, disk on both hosts) is refused by reset-state naming the move; nothing changes."""
    engine = _cloud(db_url, fakes)
    try:
        engine.hosts.add("b", "fake://", vcpus=8, memory_mb=8192, disk_gb=80)
        engine.hosts.heartbeat("b")
        uuid = _vm(engine)
        engine.resize(uuid, Flavor(2, 512, 2))
        before = engine.get(uuid)
        with pytest.raises(InvalidInput, match="has an open move"):
            engine.reset_state(uuid, state=V.ACTIVE, reason="x")
        assert engine.get(uuid) == before
        engine.revert_resize(uuid)
        assert engine.reset_state(uuid, state=V.ACTIVE, reason="now it may").vm_state is V.ACTIVE
    finally:
        engine.close()


def test_a_delete_worker_fenced_by_reset_state_releases_no_claim(cloud: Engine, fakes: Fakes) -> None:
    """A delete held in destroy, ended by reset-state, wakes fenced: the instance keeps its claim (no accounting hole)."""
    uuid = _vm(cloud)
    gate = fakes["a"].faults.hold("destroy")
    errors: list[BaseException] = []

    def delete() -> None:
        try:
            cloud.force_delete(uuid)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=delete)
    worker.start()
    assert gate.wait_entered()
    cloud.reset_state(uuid, state=V.ACTIVE, reason="the delete was a mistake")
    gate.release()
    worker.join(10)
    assert len(errors) == 1 and isinstance(errors[0], Fenced)
    assert cloud.store.claims.of(uuid) == ["a"]
    assert next(h for h in cloud.hosts.list() if h.name == "a").memory_mb_used == SMALL.memory_mb
