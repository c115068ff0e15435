"""Power operations: start, stop, reboot (soft, hard), pause, suspend, rescue and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lifecycle import graph, validation
from lifecycle.drivers.base import RebootType
from lifecycle.graph import Op
from lifecycle.registry import Definition, register
from lifecycle.states import TaskState
from lifecycle.tasks import TaskRun

__all__ = [
    "FORCE_STOP",
    "PAUSE",
    "REBOOT",
    "REBOOT_HARD",
    "RESCUE",
    "RESUME",
    "START",
    "STOP",
    "SUSPEND",
    "UNPAUSE",
    "UNRESCUE",
]


def start(run: TaskRun) -> None:
    """Power the guest on."""
    run.driver.power_on(run.spec)


def stop(run: TaskRun) -> None:
    """Shut the guest down cleanly within the timeout, else destroy it (disk kept)."""
    run.power_off(run.params.get("timeout"))


def stop_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a stop's ``timeout``, if given: seconds for the clean shutdown before the hard one."""
    checked = dict(params)
    if checked.get("timeout") is not None:
        checked["timeout"] = validation.seconds("stop timeout", checked["timeout"])
    return checked


def reboot(run: TaskRun) -> None:
    """Soft reboot: rebooting -> reboot_pending -> reboot_started, then through the guest."""
    run.advance(TaskState.REBOOT_PENDING)
    run.advance(TaskState.REBOOT_STARTED)
    run.driver.reboot(run.spec, RebootType.SOFT)


def reboot_hard(run: TaskRun) -> None:
    """Hard reboot: rebooting_hard -> reboot_pending_hard -> reboot_started_hard, then reset.

    Over a pause or suspend still in flight, the reset waits for that call to
    end first (:mod:`lifecycle.preemption`), so that it lands last.
    """
    run.advance(TaskState.REBOOT_PENDING_HARD)
    run.advance(TaskState.REBOOT_STARTED_HARD)
    run.wait_for_preempted()
    run.driver.reboot(run.spec, RebootType.HARD)


def pause(run: TaskRun) -> None:
    """Freeze the vCPUs."""
    run.driver.pause(run.instance.uuid)


def unpause(run: TaskRun) -> None:
    """Thaw the vCPUs."""
    run.driver.unpause(run.instance.uuid)


def suspend(run: TaskRun) -> None:
    """Save memory to disk; remember the vm_state to resume to, as Nova's old_vm_state."""
    run.driver.suspend(run.instance.uuid)
    run.ending.fields["previous_vm_state"] = run.source_vm_state


def resume(run: TaskRun) -> None:
    """Restore the saved memory."""
    run.driver.resume(run.spec)
    run.ending.fields["previous_vm_state"] = None


def rescue(run: TaskRun) -> None:
    """Boot from the rescue image."""
    run.driver.rescue(run.spec)


def unrescue(run: TaskRun) -> None:
    """Boot from the instance's own disk again."""
    run.driver.unrescue(run.spec)


START = register(Definition(graph.operation(Op.START), start))
STOP = register(Definition(graph.operation(Op.STOP), stop, params=stop_params))
FORCE_STOP = register(Definition(graph.operation(Op.FORCE_STOP), stop, params=stop_params))
REBOOT = register(Definition(graph.operation(Op.REBOOT), reboot))
REBOOT_HARD = register(Definition(graph.operation(Op.REBOOT_HARD), reboot_hard))
PAUSE = register(Definition(graph.operation(Op.PAUSE), pause))
UNPAUSE = register(Definition(graph.operation(Op.UNPAUSE), unpause))
SUSPEND = register(Definition(graph.operation(Op.SUSPEND), suspend))
RESUME = register(Definition(graph.operation(Op.RESUME), resume))
RESCUE = register(Definition(graph.operation(Op.RESCUE), rescue))
UNRESCUE = register(Definition(graph.operation(Op.UNRESCUE), unrescue))
