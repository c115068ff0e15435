"""Idempotency keys: the same key for the same call returns the first call's task and outcome."""

from __future__ import annotations

import asyncio
import threading
import uuid as uuidlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from lifecycle import (
    AlreadyExists,
    AsyncEngine,
    Engine,
    Flavor,
    IdempotencyMismatch,
    NoValidHost,
    Outcome,
    Preempted,
    TaskFailed,
    VmState,
)
from lifecycle.clock import ManualClock
from lifecycle.records import Task
from lifecycle.waiting import TaskWaitTimeout
from tests.conftest import FLAVOR, Fakes, make_engine


def test_same_key_returns_the_existing_task(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A repeated stop with the same key returns the first task and runs nothing new."""
    uuid = new_instance()
    first = engine.stop(uuid, idempotency_key="k-1")
    again = engine.stop(uuid, idempotency_key="k-1")
    assert again.id == first.id and again.outcome is Outcome.SUCCEEDED
    assert [t.operation for t in engine.tasks(uuid)] == ["create", "stop"]
    assert engine.get(uuid).vm_state is VmState.STOPPED


def test_same_key_while_running_waits_like_the_first_call(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A retry arriving while the first call runs: wait=False gets the running task, wait=True blocks until its end."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("pause")
    started = engine.pause(uuid, idempotency_key="k-2", wait=False)
    assert gate.wait_entered()
    assert engine.pause(uuid, idempotency_key="k-2", wait=False).id == started.id
    answers: list[Task] = []
    retry = threading.Thread(target=lambda: answers.append(engine.pause(uuid, idempotency_key="k-2")))
    retry.start()
    retry.join(0.3)
    assert retry.is_alive() and answers == []  # still waiting for the first call's end
    gate.release()
    retry.join(10)
    assert [(t.id, t.outcome) for t in answers] == [(started.id, Outcome.SUCCEEDED)]
    assert engine.get(uuid).vm_state is VmState.PAUSED


def test_a_retry_of_a_preempted_call_raises_preempted_as_the_first_did(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A keyed stop taken over by a delete raises Preempted; its retry raises Preempted too, not a quiet return."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("power_off")
    first: list[BaseException] = []

    def stop() -> None:
        try:
            engine.stop(uuid, idempotency_key="s-1")
        except Preempted as exc:
            first.append(exc)

    worker = threading.Thread(target=stop)
    worker.start()
    assert gate.wait_entered()
    engine.delete(uuid)
    gate.release()
    worker.join(10)
    assert len(first) == 1
    with pytest.raises(Preempted):
        engine.stop(uuid, idempotency_key="s-1")


def test_racing_keyed_stops_all_answer_as_the_first_call(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Eight threads stopping with one key while the stop is held: every one returns the same succeeded task."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("power_off")
    answers: list[tuple[str, Outcome]] = []
    lock = threading.Lock()

    def stop() -> None:
        task = engine.stop(uuid, idempotency_key="race")
        with lock:
            answers.append((task.id, task.outcome))

    threads = [threading.Thread(target=stop) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert gate.wait_entered()
    gate.release()
    for thread in threads:
        thread.join(20)
    assert len(answers) == 8 and len(set(answers)) == 1 and answers[0][1] is Outcome.SUCCEEDED


def test_a_replayed_failure_fails_again(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """A repeat of a call that failed raises TaskFailed for the same task, and runs nothing new."""
    uuid = new_instance()
    fakes["h1"].faults.fail_next("pause")
    with pytest.raises(TaskFailed) as first:
        engine.pause(uuid, idempotency_key="p")
    with pytest.raises(TaskFailed) as again:
        engine.pause(uuid, idempotency_key="p")
    failed: Task = again.value.task
    assert failed.id == first.value.task.id and failed.outcome is Outcome.FAILED
    assert [t.operation for t in engine.tasks(uuid)] == ["create", "pause"]


@pytest.fixture
def up(engine: Engine) -> Engine:
    """The engine with both its hosts heartbeated, so the scheduler may place a create."""
    for host in ("h1", "h2"):
        engine.hosts.heartbeat(host)
    return engine


def test_a_repeated_create_returns_the_first_instance(up: Engine) -> None:
    """create with a key, repeated with the same arguments and no uuid, returns the first task and builds nothing new."""
    first = up.create("web", flavor=FLAVOR, image="cirros", idempotency_key="c-1")
    again = up.create("web", flavor=FLAVOR, image="cirros", idempotency_key="c-1")
    assert (again.id, again.instance_uuid) == (first.id, first.instance_uuid)
    assert [i.uuid for i in up.list()] == [first.instance_uuid]


def test_a_create_retried_with_its_chosen_uuid_replays_instead_of_already_exists(up: Engine) -> None:
    """A client-chosen uuid retried with the same key gets the first result; without a key it is AlreadyExists."""
    chosen = str(uuidlib.uuid4())
    first = up.create("web", flavor=FLAVOR, image="cirros", uuid=chosen, idempotency_key="c-2")
    assert up.create("web", flavor=FLAVOR, image="cirros", uuid=chosen, idempotency_key="c-2").id == first.id
    with pytest.raises(AlreadyExists):
        up.create("web", flavor=FLAVOR, image="cirros", uuid=chosen)


@pytest.mark.parametrize(
    "changed",
    [{"name": "other"}, {"host": "h2"}, {"flavor": Flavor(vcpus=2, memory_mb=64, root_gb=1)}, {"uuid": "chosen"}],
    ids=["name", "host", "flavor", "uuid"],
)
def test_a_create_key_reused_with_other_arguments_is_refused(up: Engine, changed: dict[str, Any]) -> None:
    """The same create key with another name, host, flavor or uuid is IdempotencyMismatch, and nothing is built."""
    up.create("web", host="h1", flavor=FLAVOR, image="cirros", idempotency_key="c-3")
    call: dict[str, Any] = {"name": "web", "host": "h1", "flavor": FLAVOR, "image": "cirros"} | changed
    if call.get("uuid") == "chosen":
        call["uuid"] = str(uuidlib.uuid4())
    with pytest.raises(IdempotencyMismatch, match="a key may be repeated only for the very same call"):
        up.create(idempotency_key="c-3", **call)
    assert len(up.list()) == 1


def test_a_create_with_empty_metadata_replays_as_one_without(up: Engine) -> None:
    """create(metadata={}) retried with no metadata (or {} after None) under the same key is the same call, not a mismatch."""
    first = up.create("web", flavor=FLAVOR, image="cirros", idempotency_key="c-m", metadata={})
    assert up.create("web", flavor=FLAVOR, image="cirros", idempotency_key="c-m").id == first.id
    other = up.create("db", flavor=FLAVOR, image="cirros", idempotency_key="c-n")
    assert up.create("db", flavor=FLAVOR, image="cirros", idempotency_key="c-n", metadata={}).id == other.id
    assert len(up.list()) == 2


def test_a_create_key_is_not_another_operation_key(up: Engine, new_instance: Callable[..., str]) -> None:
    """A key first used by a stop, then given to a create, is refused rather than answered with the stop."""
    up.stop(new_instance(), idempotency_key="k-shared")
    with pytest.raises(IdempotencyMismatch):
        up.create("web", flavor=FLAVOR, image="cirros", idempotency_key="k-shared")


def test_concurrent_repeats_of_a_create_build_one_instance(up: Engine) -> None:
    """Eight threads sending the same keyed create at once all get the one task, and one instance is built."""
    barrier = threading.Barrier(8)
    got: list[str] = []

    def send() -> None:
        barrier.wait()
        got.append(up.create("web", flavor=FLAVOR, image="cirros", idempotency_key="c-4").id)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(got) == 8 and len(set(got)) == 1
    assert len(up.list()) == 1


def test_a_replayed_create_with_no_room_fails_again_as_no_valid_host(up: Engine) -> None:
    """A keyed create that found no host raises NoValidHost (and TaskFailed) again when repeated, building nothing."""
    huge = Flavor(vcpus=1, memory_mb=64, root_gb=1, extra_specs={"capabilities:tier": "gold"})
    with pytest.raises(NoValidHost) as first:
        up.create("big", flavor=huge, image="cirros", idempotency_key="c-5")
    with pytest.raises(NoValidHost) as again:
        up.create("big", flavor=huge, image="cirros", idempotency_key="c-5")
    assert isinstance(again.value, TaskFailed) and isinstance(first.value, TaskFailed)
    assert again.value.task.id == first.value.task.id
    assert len(up.list(include_deleted=True)) == 1


def test_a_repeat_does_not_wait_for_a_task_whose_owner_stopped_renewing_it(
    db_url: str, engine: Engine, fakes: Fakes, clock: ManualClock, new_instance: Callable[..., str]
) -> None:
    """Seen by another engine past the first call's lease, a waiting repeat says recovery must act instead of hanging."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("pause")
    first = engine.pause(uuid, idempotency_key="k-left", wait=False)
    assert gate.wait_entered()
    other = make_engine(db_url, fakes, clock=ManualClock(clock.now() + timedelta(hours=1)), shutdown_timeout=0.0)
    try:
        with pytest.raises(TaskWaitTimeout, match="was left by its owner") as refused:
            other.pause(uuid, idempotency_key="k-left")
        assert refused.value.task.id == first.id
        assert other.pause(uuid, idempotency_key="k-left", wait=False).id == first.id  # the 202 form answers at once
    finally:
        gate.release()
        engine.runner.wait_idle()
        other.close()
    assert engine.pause(uuid, idempotency_key="k-left").outcome is Outcome.SUCCEEDED  # its owner's repeat waited


def test_a_202_repeat_of_a_failed_call_returns_the_failed_task(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """wait=False answers with the task as it is, ended or not: a failed first call's repeat returns it failed."""
    uuid = new_instance()
    fakes["h1"].faults.fail_next("pause")
    first = engine.pause(uuid, idempotency_key="k-202", wait=False)
    engine.runner.wait_idle()
    again = engine.pause(uuid, idempotency_key="k-202", wait=False)
    assert (again.id, again.outcome) == (first.id, Outcome.FAILED)
    with pytest.raises(TaskFailed):
        engine.pause(uuid, idempotency_key="k-202")


def test_an_awaited_repeat_does_not_wait_for_a_task_whose_owner_stopped_renewing_it(
    db_url: str, engine: Engine, fakes: Fakes, clock: ManualClock, new_instance: Callable[..., str]
) -> None:
    """AsyncEngine's repeat answers as Engine's: TaskWaitTimeout naming recovery, not an endless await."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("pause")
    first = engine.pause(uuid, idempotency_key="k-left-aio", wait=False)
    assert gate.wait_entered()
    other = make_engine(db_url, fakes, clock=ManualClock(clock.now() + timedelta(hours=1)), shutdown_timeout=0.0)

    async def repeat() -> None:
        async with AsyncEngine(other) as aengine:
            with pytest.raises(TaskWaitTimeout, match="was left by its owner") as refused:
                await asyncio.wait_for(aengine.pause(uuid, idempotency_key="k-left-aio"), 10)
            assert refused.value.task.id == first.id

    try:
        asyncio.run(repeat())
    finally:
        gate.release()
        engine.runner.wait_idle()
        other.close()
