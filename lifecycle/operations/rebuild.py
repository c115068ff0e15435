"""Rebuild: a fresh disk on the same or a new image, same identity and host."""

from __future__ import annotations

from dataclasses import replace

from lifecycle.states import TaskState, VmState
from lifecycle.tasks import Steps, TaskRun

__all__ = ["STEPS"]


def rebuild(run: TaskRun) -> None:
    """Walk rebuilding -> rebuild_block_device_mapping -> rebuild_spawning.

    The old domain and disk are destroyed, then a new one is spawned, as
    Nova's manager does. Destroying is recorded as done once it completes, so
    a run resumed after a crash never destroys the new disk; spawning is
    repeat-safe (an existing domain is left as it is). A stopped instance is
    powered off again afterwards so it ends stopped.
    """
    run.advance(TaskState.REBUILD_BLOCK_DEVICE_MAPPING)  # the new overlay is made by the driver
    run.advance(TaskState.REBUILD_SPAWNING)
    host = run.instance.host
    assert host is not None
    # Everything of the instance there but what this task made (a resumed or stalled run never destroys the new
    # disk of another epoch); recorded done once it completed.
    run.once("old_disk_destroyed", lambda: run.clear_leftovers(host, why="rebuilding from the image"))
    run.fields["disk"] = run.driver.spawn(replace(run.spec, disk=None), power_on=True)
    run.fields["image"] = run.image.name
    if run.source_vm_state is VmState.STOPPED:
        run.power_off(timeout=0)


STEPS: dict[str, Steps] = {"rebuild": rebuild}
