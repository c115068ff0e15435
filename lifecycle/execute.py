"""Running a task's steps and writing its end: succeeded, failed, or lost to a preemptor.

:func:`execute` runs an operation's steps on a :class:`lifecycle.tasks.TaskRun`
and ends the task once: :func:`succeed` and :func:`fail` write the last
compare-and-swap from the run's :class:`lifecycle.ending.Ending`, which then
records the end. A worker whose task was taken over writes nothing more: it
undoes what its late driver call left (a delete's preemption), and lets a
waiting preemptor go on.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import replace

import structlog

from lifecycle import graph, preemption
from lifecycle.errors import DriverError, Fenced, NoValidHost, NoValidHostFailed, Preempted, TaskFailed
from lifecycle.logs import get_logger
from lifecycle.records import Outcome, Task
from lifecycle.states import PowerState, VmState
from lifecycle.tasks import Steps, TaskRun

__all__ = ["execute", "fail", "failed", "outcome_of", "preempted", "succeed"]

log = get_logger(__name__)


def execute(run: TaskRun, steps: Steps) -> Task:
    """Run ``steps`` and end the task; return it finished.

    Raises :class:`Preempted` when another task took the instance over (the
    instance is left to it) and :class:`TaskFailed` when the operation failed
    (the failure is recorded first).
    """
    started = time.perf_counter()
    with structlog.contextvars.bound_contextvars(
        instance_uuid=run.instance.uuid, task_id=run.task.id, request_id=run.task.request_id
    ):
        try:
            run.before_power = _power_or(run, run.instance.power_state)
            steps(run)
            succeed(run)
            _clean_up(run)
        except Preempted as exc:
            _lost(run, started, exc)
            raise
        except Exception as exc:
            lost = _was_preempted(run, exc)
            if lost is not None:
                _lost(run, started, lost)
                raise lost from exc
            try:
                fail(run, exc)
            except Preempted as late:
                _lost(run, started, late)
                raise
            _finished(run, started)
            raise failed(run.task, exc) from exc
        _finished(run, started)
        return run.task


def outcome_of(task: Task) -> Task:
    """Answer for an ended task as ``wait=True`` does: return it succeeded, raise its failure or preemption.

    The one place a task's end becomes the caller's return or exception, for
    a worker that ran it here and for whoever waits on it (:mod:`lifecycle.waiting`).
    """
    if task.outcome is Outcome.FAILED:
        raise failed(task)
    if task.outcome is Outcome.PREEMPTED:
        raise preempted(task)
    return task


def failed(task: Task, cause: BaseException | None = None) -> TaskFailed:
    """Return the error a caller gets for a failed ``task``: a :class:`NoValidHostFailed` when no host would take it.

    ``cause`` is the exception that ended it when it ended here; a task read
    back (a wait, a replay) is a NoValidHost failure by its recorded error.
    """
    error = task.error or (str(cause) if cause is not None else "failed")
    if isinstance(cause, NoValidHost):
        return NoValidHostFailed(task, error, cause.reasons)
    if cause is None and error.startswith(f"{NoValidHost.__name__}:"):
        return NoValidHostFailed(task, error, {})
    return TaskFailed(task, error)


def preempted(task: Task) -> Preempted:
    """Return the error a task taken over by another raises."""
    return Preempted(task.id, task.instance_uuid, task.preempted_by)


def succeed(run: TaskRun) -> None:
    """Write the success of ``run``: the graph's vm_state, task idle, fresh power."""
    power = run.ending.end_power if run.ending.end_power is not None else run.read_power()
    vm_state = graph.end_vm_state(
        run.task.operation,
        run.source_vm_state,
        succeeded=True,
        power=power,
        previous=run.instance.previous_vm_state,
    )
    run.instance = run.store.writes.finish(
        run.instance,
        run.task,
        vm_state=vm_state,
        power_state=power,
        outcome=Outcome.SUCCEEDED,
        why=run.why(run.ending.note),
        **run.ending.fields,
    )
    _ended(run, Outcome.SUCCEEDED)


def fail(run: TaskRun, exc: BaseException) -> None:
    """Write the failure of ``run``: vm_state kept if the guest is unchanged, else per the table.

    Whatever ``exc`` is, the task ends here with it and its traceback; a
    driver that cannot even report power leaves power NOSTATE.
    """
    try:
        power = run.read_power()
    except Exception as unreadable:  # the failure is being recorded: nothing may stop that
        log.warning("power_unreadable_at_failure", error=f"{type(unreadable).__name__}: {unreadable}")
        power = PowerState.NOSTATE
    vm_state = graph.end_vm_state(
        run.task.operation,
        run.source_vm_state,
        succeeded=False,
        power=power,
        before_power=None if run.ending.changed else run.before_power,
    )
    # A NUL byte (in a hypervisor's message) is shown escaped: PostgreSQL text cannot hold one, and a
    # refused failure write would leave the task running until recovery.
    message = f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00")
    trace = "".join(traceback.format_exception(exc)).replace("\x00", "\\x00")
    run.instance = run.store.writes.finish(
        run.instance,
        run.task,
        vm_state=vm_state,
        power_state=power,
        outcome=Outcome.FAILED,
        why=run.why(message),
        error=message,
        traceback=trace,
        **run.ending.fail_fields,
    )
    _ended(run, Outcome.FAILED, message, trace)


def _ended(run: TaskRun, outcome: Outcome, error: str | None = None, trace: str | None = None) -> None:
    # The task row as the end's write left it (that write proved the epoch ours): no read needed to return it.
    run.ending.record(outcome, error=error, trace=trace)
    at = run.instance.updated_at
    run.task = replace(run.task, outcome=outcome, finished_at=at, lease_expires_at=at, error=error, traceback=trace)


def _clean_up(run: TaskRun) -> None:
    """Run the clean-ups of a task whose success is written; one failing is logged, never the task's failure."""
    for action in run.ending.after_success:
        try:
            action()
        except Exception as exc:
            log.warning("clean_up_failed", error=f"{type(exc).__name__}: {exc}")


def _power_or(run: TaskRun, default: PowerState) -> PowerState:
    try:
        power = run.read_power()
    except DriverError:
        return default
    run.power_read = True
    return power


def _lost(run: TaskRun, started: float, exc: Preempted) -> None:
    """End a worker whose task was taken over: reconcile its late call, then let a waiting preemptor go on."""
    if not isinstance(exc, Fenced):  # a fenced worker's lease now belongs to the recovering engine
        _after_preemption(run, exc.preempted_by)
        run.store.tasks.release_lease(run.task.id)
    run.ending.record(Outcome.PREEMPTED, preempted_by=exc.preempted_by, fenced=isinstance(exc, Fenced))
    _finished(run, started)


def _after_preemption(run: TaskRun, preempted_by: str | None) -> None:
    """Undo on the hypervisor what this worker's last driver call did after a delete took over.

    The delete destroyed the guest while this worker was inside a driver
    call; that call (a spawn, a power on) may have made or started a domain
    after the destroy. Destroying again, on every host this run touched, and
    releasing claims taken after the delete released them, leaves nothing
    behind; both are repeat-safe, so racing the delete's own cleanup is harmless.
    """
    if preempted_by is None:
        return
    preemptor = run.store.tasks.get(preempted_by)
    if preemption.rule(preemptor.operation, run.task.operation) is not preemption.Rule.DESTROY_LATE:
        return  # WAIT: the preemptor waited for this call; CONVERGE: the late call agrees with it
    now_row = run.store.instances.get(run.instance.uuid)
    deleted = now_row.vm_state is VmState.DELETED
    if not deleted and now_row.task_id != preemptor.id:
        return  # the delete failed (the instance lives on, error): what the late call made is the instance's
    recorded = {run.instance.host} if run.instance.host is not None else set()
    for host in sorted(run.touched | recorded):
        try:
            # Only what this worker's task made: the instance's current copy (if any) is another attempt's.
            run.driver_for(host).destroy(run.instance.uuid, destroy_disks=True, attempt=run.attempt())
        except Exception as exc:  # an unreachable host: its daemon reaps the leftover later
            log.warning("preempted_leftover_not_destroyed", host=host, error=f"{type(exc).__name__}: {exc}")
    # Also while the delete still runs: it may have released the claims already, before this late one.
    run.store.claims.release(run.instance.uuid)
    log.info("preempted_leftover_destroyed", preempted_by=preempted_by)


def _was_preempted(run: TaskRun, exc: Exception) -> Preempted | None:
    # A driver call can fail *because* a preemptor destroyed the domain under it:
    # the failure then belongs to nobody and must not touch the instance.
    task = run.store.tasks.get(run.task.id)
    if task.epoch != run.task.epoch:
        return Fenced(task.id, task.instance_uuid, run.task.epoch, task.epoch)
    if task.outcome is Outcome.PREEMPTED:
        log.info("task_preempted", error=str(exc), preempted_by=task.preempted_by)
        return preempted(task)
    return None


def _finished(run: TaskRun, started: float) -> None:
    """Log the one summary line of a finished operation, from its recorded ending."""
    i = run.instance
    outcome = run.ending.outcome
    assert outcome is not None
    log.info(
        "operation_finished",
        operation=run.task.operation,
        outcome=outcome.value,
        vm_state=i.vm_state.value,
        power_state=int(i.power_state),
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        **run.ending.log_extra(),
    )
