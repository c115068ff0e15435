"""Crash recovery: what to do with each task found running with a dead owner.

A task is recoverable when its owner's lease has expired, or when the engine
recovering it carries the same owner name (a restarted process with a stable
owner). :func:`plan` decides, per task_state and pure, whether to resume the
operation forward or roll it back; every task_state has a defined answer,
where Nova's ``init_host`` leaves about fifteen task_states stuck until an
operator resets them by hand.

A task is taken over with a compare-and-swap on the epoch recovery read it
at (:meth:`lifecycle.store.tasks.Tasks.take_over`, ``store.tasks.take_over``): of two recoveries that read it
at once, even under one owner name with ``force``, only one runs it.

Resuming is safe because every driver call is repeat-safe by contract, the
walk skips the task_states already written, and the one destructive call
that must not run twice (rebuild's new disk) leaves a durable "done" step
that a resumed run honours. Rolling back ends the task failed through the
operation's failure rule (create: error, claims released). Which
task_states roll back, and how, is the operation's own definition's
(:attr:`lifecycle.registry.Definition.roll_back_in`): recovery names no operation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from lifecycle import graph
from lifecycle.errors import LifecycleError, Preempted, TaskFailed
from lifecycle.execute import fail
from lifecycle.logs import get_logger
from lifecycle.operations import definition
from lifecycle.records import Task
from lifecycle.states import PowerState, TaskState

if TYPE_CHECKING:
    from lifecycle.runner import Runner
    from lifecycle.tasks import TaskRun

__all__ = ["Plan", "Recovered", "RecoveryOutcome", "RecoveryRollBack", "Verdict", "plan", "recover_tasks"]

log = get_logger(__name__)


class Plan(enum.StrEnum):
    """What recovery does with a task."""

    RESUME = enum.auto()  # the stored "resume": a literal of it would read as the operation of that name
    """Take the task over and run the rest of the operation, then finish it."""
    ROLL_BACK = "roll_back"
    """Take the task over and end it failed, by the operation's failure rule."""


class RecoveryOutcome(enum.StrEnum):
    """What became of a task recovery took over (its text is what logs, metrics and the CLI show)."""

    SUCCEEDED = "succeeded"
    """Resumed and finished."""
    FAILED = "failed"
    """Resumed, and the rest of the operation failed; or closed, the instance no longer being the task's."""
    ROLLED_BACK = "rolled_back"
    """Ended failed by the operation's failure rule, without running the rest."""
    PREEMPTED = "preempted"
    """Another task took the instance over while recovery ran it."""
    ERROR = "error"
    """Recovery itself failed on it (logged with its traceback); the next recovery tries again."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A plan and the reason for it, recorded in the audit log."""

    plan: Plan
    reason: str


def plan(operation: str, task_state: TaskState) -> Verdict:
    """Return the recovery verdict for a task of ``operation`` found in ``task_state``."""
    if task_state not in graph.operation(operation).walk:
        raise ValueError(f"{task_state.value} is not in the {operation} walk")
    why = definition(operation).roll_back_in.get(task_state)
    if why is not None:
        return Verdict(Plan.ROLL_BACK, why)
    return Verdict(Plan.RESUME, f"resumed from {task_state.value}: the remaining steps are repeat-safe")


class RecoveryRollBack(LifecycleError):
    """The reason a recovered task was ended failed instead of resumed."""


@dataclass(frozen=True, slots=True)
class Recovered:
    """What recovery did with one task."""

    task_id: str
    instance_uuid: str
    operation: str
    task_state: str | None
    plan: str
    outcome: RecoveryOutcome
    reason: str


def recover_tasks(runner: Runner, *, force: bool = False, of_owner: str | None = None) -> list[Recovered]:
    """Take over and finish every recoverable task; return what became of each.

    With ``force``, the live tasks of ``of_owner`` (default the runner's own
    name) are taken too. Taken tasks belong to the runner's owner from then
    on: a recovery running under a name of its own is never itself taken
    over by a second forced recovery of the dead engine's name.
    """
    results = []
    store = runner.store
    victim = of_owner or runner.owner
    for read in store.tasks.recoverable(victim, force=force):
        if read.id in runner.active:
            continue  # this engine's own worker is running it right now
        task = store.tasks.take_over(read, runner.owner, force=force, of_owner=victim)  # a CAS on the epoch read
        if task is None:
            continue  # another recovery took it first (or it ended) since it was read
        with structlog.contextvars.bound_contextvars(instance_uuid=task.instance_uuid, task_id=task.id):
            try:
                result = _recover(runner, task)
            except Exception as exc:  # one task that cannot be recovered must not keep the others stuck
                log.exception("task_recovery_failed", operation=task.operation)
                error = f"{type(exc).__name__}: {exc}"
                result = Recovered(
                    task.id, task.instance_uuid, task.operation, None, "error", RecoveryOutcome.ERROR, error
                )
            results.append(result)
            log.info("task_recovered", **{k: v for k, v in vars_of(result).items() if k != "task_id"})
    return results


def vars_of(recovered: Recovered) -> dict[str, str | None]:
    """Return a result as a plain mapping (for logs and JSON)."""
    return {name: getattr(recovered, name) for name in Recovered.__slots__}


def _recover(runner: Runner, task: Task) -> Recovered:
    instance = runner.store.instances.get(task.instance_uuid)
    state = None if instance.task_state is None else instance.task_state.value
    if instance.task_id != task.id or instance.task_state is None:
        reason = "the instance no longer belongs to this task"
        runner.store.tasks.end_orphan(task, reason)
        return Recovered(task.id, task.instance_uuid, task.operation, state, "close", RecoveryOutcome.FAILED, reason)
    verdict = plan(task.operation, instance.task_state)
    run = runner.resume(task, instance)
    try:
        if verdict.plan is Plan.ROLL_BACK:
            _roll_back(run, verdict.reason)
            outcome = RecoveryOutcome.ROLLED_BACK
        else:
            runner.ensure_heartbeat()
            runner.work(run)
            outcome = RecoveryOutcome.SUCCEEDED
    except TaskFailed as exc:
        outcome = RecoveryOutcome.FAILED if verdict.plan is Plan.RESUME else RecoveryOutcome.ROLLED_BACK
        return Recovered(task.id, task.instance_uuid, task.operation, state, verdict.plan.value, outcome, exc.error)
    except Preempted:
        outcome = RecoveryOutcome.PREEMPTED
    return Recovered(task.id, task.instance_uuid, task.operation, state, verdict.plan.value, outcome, verdict.reason)


def _roll_back(run: TaskRun, reason: str) -> None:
    hook = definition(run.task.operation).roll_back
    if hook is not None:
        hook(run)
    try:
        run.before_power = run.read_power()
    except Exception:  # an unreachable host must not keep a roll-back (which needs no driver) from ending
        run.before_power = PowerState.NOSTATE
    fail(run, RecoveryRollBack(reason))
    raise TaskFailed(run.store.tasks.get(run.task.id), f"RecoveryRollBack: {reason}")
