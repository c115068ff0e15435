"""Idempotency keys: the same key on the same instance returns the first task."""

from __future__ import annotations

from collections.abc import Callable

from lifecycle import Engine, Outcome, VmState
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
    gate = fakes["h1"].hold("pause")
    started = engine.pause(uuid, idempotency_key="k-2", wait=False)
    assert gate.wait_entered()
    assert engine.pause(uuid, idempotency_key="k-2").id == started.id
    gate.release()
    engine._pool().shutdown(wait=True)
    assert engine.task(started.id).outcome is Outcome.SUCCEEDED


def test_keys_are_per_instance(engine: Engine, new_instance: Callable[..., str]) -> None:
    """The same key on two instances starts two tasks."""
    a, b = new_instance("a"), new_instance("b")
    assert engine.stop(a, idempotency_key="same").id != engine.stop(b, idempotency_key="same").id
