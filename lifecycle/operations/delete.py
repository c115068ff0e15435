"""Delete, force delete, soft delete and restore."""

from __future__ import annotations

from lifecycle.operations import move
from lifecycle.states import PowerState, VmState
from lifecycle.store.db import now
from lifecycle.tasks import Steps, TaskRun

__all__ = ["STEPS"]


def delete(run: TaskRun) -> None:
    """Shut the guest down cleanly (bounded), then destroy the domain and its disk."""
    uuid = run.instance.uuid
    if run.driver.list_instances().owned.get(uuid) not in (None, PowerState.SHUTDOWN):
        run.driver.power_off(
            uuid, timeout=run.settings.shutdown_timeout, retry_interval=run.settings.shutdown_retry_interval
        )
    _destroy(run)


def force_delete(run: TaskRun) -> None:
    """Destroy the domain and its disk at once, with no clean shutdown."""
    _destroy(run)


def _destroy(run: TaskRun) -> None:
    if run.source_vm_state is VmState.RESIZED:
        # Confirm first, as Nova does, so nothing is left on the source (bug 1202484).
        migration = run.store.open_migration(run.instance.uuid)
        if migration is not None:
            move.confirm_on_source(run, migration)
    run.store.revoke_console_tokens(run.instance.uuid)
    run.driver.destroy(run.instance.uuid, destroy_disks=True)
    run.store.release_claims(run.instance.uuid)
    run.end_power = PowerState.NOSTATE
    run.fields["deleted_at"] = now()


def soft_delete(run: TaskRun) -> None:
    """Power the guest off and keep everything for a later restore or reclaim."""
    run.driver.power_off(
        run.instance.uuid, timeout=run.settings.shutdown_timeout, retry_interval=run.settings.shutdown_retry_interval
    )


def restore(run: TaskRun) -> None:
    """Power a soft-deleted guest back on."""
    run.driver.power_on(run.spec)


STEPS: dict[str, Steps] = {
    "delete": delete,
    "force_delete": force_delete,
    "soft_delete": soft_delete,
    "restore": restore,
}
