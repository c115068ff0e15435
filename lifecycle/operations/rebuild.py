"""Rebuild: a fresh disk on the same or a new image, same identity and host."""

from __future__ import annotations

from lifecycle.states import VmState
from lifecycle.tasks import Steps, TaskRun

__all__ = ["STEPS"]


def rebuild(run: TaskRun) -> None:
    """Walk rebuilding -> rebuild_block_device_mapping -> rebuild_spawning.

    The domain and its disk are replaced in the spawning step; a stopped
    instance is powered off again afterwards so it ends stopped.
    """
    run.advance()  # rebuild_block_device_mapping: the new overlay is made by the driver
    run.advance()  # rebuild_spawning
    run.driver.rebuild(run.spec)
    run.fields["image"] = run.image.name
    if run.source_vm_state is VmState.STOPPED:
        run.driver.power_off(run.instance.uuid, timeout=0, retry_interval=0)


STEPS: dict[str, Steps] = {"rebuild": rebuild}
