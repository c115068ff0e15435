"""Waiting for a task's end wherever it runs: on this engine's pool, in another thread, in another process.

:func:`wait` (``Engine.wait``) reads the task until it has ended, then answers
as ``wait=True`` does (:func:`lifecycle.execute.outcome_of`): the task when it
succeeded, :class:`TaskFailed` or :class:`Preempted` otherwise. A task this
engine's pool runs is waited for on its future; any other is read from the
database every 10 ms at first, then less often, up to every 250 ms. A task
that recovery took over is waited for to its end under its new owner. The
wait gives up after ``timeout`` seconds with :class:`TaskWaitTimeout`; the
task is not cancelled. :class:`Watch` is the part the asyncio form
(:class:`lifecycle.aio.AsyncEngine`) shares.
"""

from __future__ import annotations

import time
from concurrent import futures

from lifecycle import validation
from lifecycle.errors import LifecycleError
from lifecycle.execute import outcome_of
from lifecycle.records import Outcome, Task
from lifecycle.runner import Runner

__all__ = ["POLL_FIRST", "POLL_MOST", "TaskWaitTimeout", "Waits", "Watch", "left_behind", "wait"]

POLL_FIRST = 0.01
"""Seconds between the first two reads of a task run elsewhere; each pause then doubles."""
POLL_MOST = 0.25
"""The longest pause between two reads of a task run elsewhere."""


class TaskWaitTimeout(LifecycleError, TimeoutError):
    """A wait gave up after ``timeout`` seconds; ``task`` (as last read) runs on: a wait never cancels it.

    A :class:`TimeoutError` too, so code that catches the builtin (or asyncio's) catches it.
    """

    def __init__(self, task: Task, timeout: float, reason: str | None = None) -> None:
        self.task = task
        self.timeout = timeout
        what = f"{task.operation} task {task.id} on instance {task.instance_uuid}"
        super().__init__(f"{what} {reason}" if reason else f"{what} still runs after a wait of {timeout:g} s")


class Watch:
    """One wait's arguments, checked, its deadline and its pace of reads."""

    def __init__(self, task_id: object, timeout: object) -> None:
        self.task_id = validation.uuid(task_id, "task")
        self.timeout = None if timeout is None else validation.seconds("wait timeout", timeout)
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self._pace = POLL_FIRST

    def left(self, task: Task) -> float | None:
        """Return the seconds left to wait for ``task`` (None: no limit); raise :class:`TaskWaitTimeout` past them."""
        if self.deadline is None or self.timeout is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TaskWaitTimeout(task, self.timeout)
        return left

    def pause(self, task: Task) -> float:
        """Return how long to wait before reading ``task`` again; raise :class:`TaskWaitTimeout` past the deadline."""
        left = self.left(task)
        pace, self._pace = self._pace, min(self._pace * 2, POLL_MOST)
        return pace if left is None else min(pace, left)


def ended(task: Task) -> bool:
    """Return whether ``task`` has ended (succeeded, failed or preempted)."""
    return task.outcome is not Outcome.RUNNING


def wait(runner: Runner, task_id: object, timeout: object = None, *, abandoned_ends: bool = False) -> Task:
    """Block until task ``task_id`` ends; return it or raise as ``wait=True`` would (see the module docstring).

    ``abandoned_ends`` (an idempotent repeat, which has no timeout of its own)
    gives up with :class:`TaskWaitTimeout` once the task's owner stopped
    renewing its lease: it then ends only when recovery takes it over.
    """
    watch = Watch(task_id, timeout)
    started = time.monotonic()
    while True:
        task = runner.store.tasks.get(watch.task_id)
        if ended(task):
            return outcome_of(task)
        left = left_behind(runner, task, started) if abandoned_ends else None
        if left is not None:
            raise left
        future = runner.future_of(task.id)
        if future is None or future.done():
            time.sleep(watch.pause(task))
        else:  # ours: woken by its end, then read again (it may have been taken over meanwhile)
            futures.wait([future], watch.left(task))


def left_behind(runner: Runner, task: Task, started: float) -> TaskWaitTimeout | None:
    """Return the error a repeat raises for a running ``task`` whose owner stopped renewing its lease, else None.

    A task this runner runs is never left behind; any other whose lease ran
    out ends only when recovery takes it over, so a repeat does not wait for it.
    """
    if task.id in runner.active or task.lease_expires_at >= runner.store.clock.now():
        return None
    reason = (
        f"was left by its owner {task.owner} (its lease ran out at {task.lease_expires_at.isoformat()}): "
        "it ends when recovery takes it over (a daemon's, or engine.recover()); ask again then"
    )
    return TaskWaitTimeout(task, time.monotonic() - started, reason)


class Waits:
    """The blocking wait of :class:`lifecycle.Engine`, mixed in (``engine.wait(task_id)``)."""

    runner: Runner

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Block until task ``task_id`` ends; return it as ``wait=True`` would, or raise what that raises.

        For a task started with ``wait=False`` here or by another process:
        :class:`TaskFailed` when it failed, :class:`Preempted` when another task
        took it over, :class:`TaskNotFound` for an unknown id, and
        :class:`lifecycle.TaskWaitTimeout` (a :class:`TimeoutError`) after
        ``timeout`` seconds, the task running on.
        """
        return wait(self.runner, task_id, timeout)
