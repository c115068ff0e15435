"""Preemption: delete and force_delete take over any task; hard reboot takes over a few."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from lifecycle import Cause, Engine, InvalidState, Outcome, PowerState, Preempted, TaskState, VmState
from lifecycle.audit import Why
from tests.conftest import Fakes
from tests.invariants import check_invariants


class Worker(threading.Thread):
    """Runs one engine call in a thread and keeps what it raised."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__()
        self.call = call
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.call()
        except BaseException as exc:
            self.error = exc


@pytest.mark.parametrize("preemptor", ["force_delete", "delete"])
def test_delete_preempts_a_worker_blocked_in_the_driver(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], preemptor: str
) -> None:
    """A stop stuck in the hypervisor is taken over; released, its worker stops without touching the row."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("power_off")
    worker = Worker(lambda: engine.stop(uuid))
    worker.start()
    assert gate.wait_entered()
    stop_task = engine.get(uuid).task_id
    assert engine.get(uuid).task_state is TaskState.POWERING_OFF

    delete_task = engine.run(preemptor, uuid)
    after_delete = engine.get(uuid)
    assert (after_delete.vm_state, after_delete.task_state, after_delete.power_state) == (
        VmState.DELETED,
        None,
        PowerState.NOSTATE,
    )
    gate.release()
    worker.join(10)
    assert isinstance(worker.error, Preempted)
    assert worker.error.preempted_by == delete_task.id
    assert engine.get(uuid) == after_delete, "the preempted worker wrote to the instance"

    stop = engine.task(stop_task)  # type: ignore[arg-type]
    assert (stop.outcome, stop.preempted_by) == (Outcome.PREEMPTED, delete_task.id)
    assert [s.result for s in engine.steps(stop.id)] == ["preempted"]
    story = [(e.operation, e.from_task_state, e.to_task_state) for e in engine.history(uuid)][-3:]
    assert story == [
        ("stop", None, "powering-off"),
        (preemptor, "powering-off", "deleting"),
        (preemptor, "deleting", None),
    ]
    assert f"preempts stop task {stop.id}" in (engine.history(uuid)[-2].message or "")
    check_invariants(engine.store)


def test_preempted_worker_in_a_multi_step_walk_stops_at_its_next_step(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A soft reboot preempted by a hard reboot fails its next compare-and-swap and stops there."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("reboot")
    worker = Worker(lambda: engine.reboot(uuid))
    worker.start()
    assert gate.wait_entered()
    assert engine.get(uuid).task_state is TaskState.REBOOT_STARTED
    hard = engine.reboot(uuid, hard=True)
    gate.release()
    worker.join(10)
    assert isinstance(worker.error, Preempted) and worker.error.preempted_by == hard.id
    i = engine.get(uuid)
    assert (i.vm_state, i.task_state, i.power_state) == (VmState.ACTIVE, None, PowerState.RUNNING)
    check_invariants(engine.store)


@pytest.mark.parametrize("held", ["pause", "suspend"])
def test_hard_reboot_preempts_pause_and_suspend(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], held: str
) -> None:
    """Hard reboot takes over pausing and suspending (Nova's ALLOW_REBOOT), and resets after the late call lands."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold(held)
    worker = Worker(lambda: engine.run(held, uuid))
    worker.start()
    assert gate.wait_entered()
    reboot = engine.reboot(uuid, hard=True, wait=False)
    gate.release()
    worker.join(10)
    engine.runner.wait_idle()
    assert isinstance(worker.error, Preempted)
    assert engine.task(reboot.id).outcome is Outcome.SUCCEEDED
    i = engine.get(uuid)
    assert (
        (i.vm_state, i.power_state)
        == (VmState.ACTIVE, PowerState.RUNNING)
        == (
            VmState.ACTIVE,
            fakes["h1"].get_info(uuid),
        )
    )
    check_invariants(engine.store)


@pytest.mark.parametrize("intruder", ["stop", "pause", "reboot", "soft_delete", "rebuild", "rescue"])
def test_other_calls_are_refused_while_a_task_runs(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str], intruder: str
) -> None:
    """Anything but delete, force_delete and (for some tasks) hard reboot is refused mid-task."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("power_off")
    worker = Worker(lambda: engine.stop(uuid))
    worker.start()
    assert gate.wait_entered()
    with pytest.raises(InvalidState):
        engine.run(intruder, uuid)
    with pytest.raises(InvalidState):
        engine.reboot(uuid, hard=True)  # powering-off is not in Nova's ALLOW_REBOOT
    gate.release()
    worker.join(10)
    assert worker.error is None
    assert engine.get(uuid).vm_state is VmState.STOPPED
    check_invariants(engine.store)


def test_delete_takes_over_a_stuck_delete(engine: Engine, fakes: Fakes, new_instance: Callable[..., str]) -> None:
    """A delete stuck in the hypervisor can be taken over by a second delete (Nova's pain point 3)."""
    uuid = new_instance()
    gate = fakes["h1"].faults.hold("destroy")
    first = Worker(lambda: engine.force_delete(uuid))
    first.start()
    assert gate.wait_entered()
    engine.force_delete(uuid)
    gate.release()
    first.join(10)
    assert isinstance(first.error, Preempted)
    assert engine.get(uuid).vm_state is VmState.DELETED
    check_invariants(engine.store)


def test_hard_reboot_taking_over_a_hard_reboot_is_audited(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A takeover that changes no state (rebooting_hard over rebooting_hard) still leaves an audit row naming it."""
    uuid = new_instance()
    stuck = engine.runner.new_task(
        uuid, "reboot_hard", params={}, request_id=None, key=None, actor="api", cause=Cause.API
    )
    engine.store.writes.begin(engine.get(uuid), stuck, TaskState.REBOOTING_HARD, Why("api", Cause.API), None)
    second = engine.reboot(uuid, hard=True)
    rows = [r for r in engine.history(uuid) if r.task_id == second.id]
    assert rows[0].from_task_state == rows[0].to_task_state == "rebooting_hard"
    assert f"preempts reboot_hard task {stuck.id}" in (rows[0].message or "")
    assert engine.task(stuck.id).outcome is Outcome.PREEMPTED
    assert engine.get(uuid).version == len(engine.history(uuid))
    check_invariants(engine.store)
