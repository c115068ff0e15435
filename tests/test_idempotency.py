"""Idempotency keys: the same key for the same call returns the first call's task and outcome."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lifecycle import Engine, IdempotencyMismatch, Outcome, TaskFailed, VmState
from lifecycle.records import Task
from tests.conftest import Fakes


def test_same_key_returns_the_existing_task(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A repeated stop with the same key returns the first task and runs nothing new."""
    uuid = new_instance()
    first = engine.stop(uuid, idempotency_key="k-1")
    again = engine.stop(uuid, idempotency_key="k-1")
    assert again.id == first.id and again.outcome is Outcome.SUCCEEDED
    assert [t.operation for t in engine.tasks(uuid)] == ["create", "stop"]
    assert engine.get(uuid).vm_state is VmState.STOPPED


def test_same_key_while_running_returns_the_running_task(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A retry that arrives while the first call still runs gets the running task, not a Conflict."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("pause")
    started = engine.pause(uuid, idempotency_key="k-2", wait=False)
    assert gate.wait_entered()
    assert engine.pause(uuid, idempotency_key="k-2").id == started.id
    gate.release()
    engine.runner.wait_idle()
    assert engine.task(started.id).outcome is Outcome.SUCCEEDED


def test_a_key_reused_on_another_instance_is_refused(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A key names one call: the same key on a second instance is refused and the second instance is untouched."""
    a, b = new_instance("a"), new_instance("b")
    engine.stop(a, idempotency_key="same")
    with pytest.raises(IdempotencyMismatch, match="very same call"):
        engine.stop(b, idempotency_key="same")
    assert engine.get(b).vm_state is VmState.ACTIVE
    assert [t.operation for t in engine.tasks(b)] == ["create"]


@pytest.mark.parametrize(
    ("second", "kwargs"),
    [("delete", {}), ("stop", {"timeout": 5.0}), ("reboot_hard", {})],
    ids=["other-operation", "other-parameters", "other-operation-preempting"],
)
def test_a_key_reused_for_another_call_is_refused(
    engine: Engine, new_instance: Callable[..., str], second: str, kwargs: dict[str, float]
) -> None:
    """stop with key K then delete (or stop with another timeout) with K is refused, not replayed: nothing is dropped."""
    uuid = new_instance()
    engine.stop(uuid, idempotency_key="k")
    with pytest.raises(IdempotencyMismatch):
        if second == "stop":
            engine.stop(uuid, idempotency_key="k", **kwargs)
        else:
            engine.run(second, uuid, idempotency_key="k")
    assert engine.get(uuid).vm_state is VmState.STOPPED
    assert [t.operation for t in engine.tasks(uuid)] == ["create", "stop"]


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
