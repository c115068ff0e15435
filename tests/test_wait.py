"""Engine.wait: a task's end as ``wait=True`` gives it, for a task run here, in another thread or by another engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from lifecycle import (
    Engine,
    InvalidInput,
    Outcome,
    Preempted,
    TaskFailed,
    TaskNotFound,
    TaskWaitTimeout,
    VmState,
)
from lifecycle.waiting import POLL_MOST
from tests.conftest import Fakes, make_engine


def _raised(call: Callable[[], object]) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_wait_returns_a_background_task_once_it_ends(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A task started with wait=False is waited for while a driver call holds it, and returned succeeded."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("power_off")
    task = engine.stop(uuid, wait=False)
    assert gate.wait_entered()
    with pytest.raises(TaskWaitTimeout) as timed_out:
        engine.wait(task.id, timeout=0.05)
    assert isinstance(timed_out.value, TimeoutError) and timed_out.value.task.outcome is Outcome.RUNNING
    assert f"stop task {task.id} on instance {uuid} still runs" in str(timed_out.value)
    threading.Timer(0.1, gate.release).start()
    ended = engine.wait(task.id, timeout=10)
    assert (ended.id, ended.outcome) == (task.id, Outcome.SUCCEEDED)
    assert engine.get(uuid).vm_state is VmState.STOPPED


def test_wait_raises_what_wait_true_raised_for_a_failed_task(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Waiting for a failed task raises the TaskFailed the blocking call raised: same class, same message."""
    uuid = new_instance()
    fakes["h1"].faults.fail_next("power_off")
    blocking = _raised(lambda: engine.stop(uuid, timeout=0))
    assert isinstance(blocking, TaskFailed)
    waited = _raised(lambda: engine.wait(blocking.task.id))
    assert type(waited) is type(blocking) and str(waited) == str(blocking)
    assert isinstance(waited, TaskFailed) and waited.task.error == blocking.task.error


def test_wait_raises_what_wait_true_raised_for_a_preempted_task(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """Waiting for a task a delete took over raises the Preempted its blocking caller got, naming the delete."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("power_off")
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            engine.stop(uuid)
        except Preempted as exc:
            errors.append(exc)

    worker = threading.Thread(target=stop)
    worker.start()
    assert gate.wait_entered()
    stop_task = engine.get(uuid).task_id
    assert stop_task is not None
    waiter = threading.Thread(target=lambda: errors.append(_raised(lambda: engine.wait(stop_task, timeout=10))))
    waiter.start()
    delete = engine.delete(uuid)
    gate.release()
    worker.join(10)
    waiter.join(10)
    assert len(errors) == 2 and all(type(e) is Preempted for e in errors), errors
    assert str(errors[0]) == str(errors[1]) and delete.id in str(errors[1])


def test_a_task_run_by_another_engine_is_waited_for_through_the_database(
    engine: Engine, fakes: Fakes, db_url: str, new_instance: Callable[..., str]
) -> None:
    """An engine that did not start the task (no future of its own) reads the database until the task ends."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("power_off")
    task = engine.stop(uuid, wait=False)
    other = make_engine(db_url, fakes)
    try:
        assert gate.wait_entered() and other.runner.future_of(task.id) is None
        threading.Timer(0.1, gate.release).start()
        started = time.monotonic()
        ended = other.wait(task.id, timeout=10)
        assert ended.outcome is Outcome.SUCCEEDED
        assert time.monotonic() - started < 0.1 + POLL_MOST + 1.0, "the reads of a waiter stopped too long"
    finally:
        gate.release()
        other.close()


def test_wait_refuses_bad_arguments_and_unknown_tasks(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A malformed id or timeout is InvalidInput, an unknown task TaskNotFound, an ended one answers at once."""
    task = engine.tasks(new_instance())[-1]
    for bad in ("not-a-uuid", None, 3):
        with pytest.raises(InvalidInput, match="task"):
            engine.wait(bad)  # type: ignore[arg-type]
    for timeout in (-1, float("nan"), True, "1"):
        with pytest.raises(InvalidInput, match="wait timeout"):
            engine.wait(task.id, timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(TaskNotFound):
        engine.wait("00000000-0000-4000-8000-000000000000")
    assert engine.wait(task.id, timeout=0) == engine.task(task.id)
