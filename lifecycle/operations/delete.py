"""Delete, force delete, soft delete and restore.

Delete must always be able to end: an instance with no host, or on a host
that is down and cannot be reached, is deleted in the database alone (Nova's
local delete). The claims go, the audit row says the guest may still exist,
and the host's daemon reaps such leftovers when the host answers again.
"""

from __future__ import annotations

import contextlib

from lifecycle import graph, snapshots
from lifecycle.errors import Conflict, DomainNotFound, DriverUnavailable
from lifecycle.graph import Op
from lifecycle.operations import move
from lifecycle.placement import host_is_up
from lifecycle.records import Migration
from lifecycle.registry import Definition, register
from lifecycle.states import MigrationStatus, PowerState
from lifecycle.tasks import TaskRun

__all__ = ["DELETE", "FORCE_DELETE", "RESTORE", "SOFT_DELETE"]


def delete(run: TaskRun) -> None:
    """Shut the guest down cleanly (bounded), then destroy the domain and its disk."""
    _delete(run, clean=True)


def force_delete(run: TaskRun) -> None:
    """Destroy the domain and its disk at once, with no clean shutdown."""
    _delete(run, clean=False)


def _delete(run: TaskRun, *, clean: bool) -> None:
    if run.instance.host is None:
        _local(run, "the instance has no host: deleted in the database only")
        return
    try:
        if clean:
            _power_off(run)
        _destroy(run)
    except DriverUnavailable as exc:
        if not _host_down(run, run.instance.host):
            raise  # an up host that failed to answer once: the caller may retry
        _local(
            run,
            f"host {run.instance.host} is down ({exc}): deleted locally; the guest may still exist there"
            " and is reaped when the host answers again",
        )


def _power_off(run: TaskRun) -> None:
    # The guest's power as read just before the steps began (NOSTATE: no domain): no second call to ask.
    # When that read failed, before_power is the database's (maybe stale): ask the host again.
    if run.power_read:
        power: PowerState | None = run.before_power
    else:
        power = run.driver.list_instances().owned.get(run.instance.uuid)
    if power not in (None, PowerState.NOSTATE, PowerState.SHUTDOWN):
        # Gone meanwhile (a preempted worker destroying what it made, an operator) is what a delete wants.
        with contextlib.suppress(DomainNotFound):
            run.power_off()


def _host_down(run: TaskRun, host: str) -> bool:
    return not host_is_up(run.store.hosts.get(host), run.settings.host_down_after, now=run.store.clock.now())


def _confirm_open_move(run: TaskRun) -> None:
    # Confirm first, as Nova does, so nothing is left on the source (bug 1202484): a resized instance's
    # move, and also one the delete took over mid-way (its source may already keep a copy).
    migration = run.store.moves.open_of(run.instance.uuid)
    if migration is not None:
        _confirm_first(run, migration)
        run.ending.fields["previous_vm_state"] = None
        run.ending.changed = True  # no longer resized: a failure from here on cannot keep that vm_state


def _destroy(run: TaskRun) -> None:
    _confirm_open_move(run)
    run.store.consoles.revoke_tokens(run.instance.uuid)
    run.driver.destroy(run.instance.uuid, destroy_disks=True)
    _forget(run)


def _confirm_first(run: TaskRun, migration: Migration) -> None:
    # A move the delete took over before it finished did not happen: its record ends in error, not confirmed.
    ends = MigrationStatus.CONFIRMED if migration.status is MigrationStatus.FINISHED else MigrationStatus.ERROR
    try:
        move.confirm_on_source(run, migration, ends=ends)
    except Conflict:
        if run.store.moves.get(migration.id).status.open:
            raise
        return  # the task this delete took over closed the move meanwhile: nothing is left to confirm
    except DriverUnavailable:
        if not _host_down(run, migration.source_host):
            raise
        # The source's kept disk stays behind; the host's image cache cleanup removes it once it answers.
        run.store.claims.release(run.instance.uuid, migration.source_host)
        run.migration_status(migration.id, ends)


def _local(run: TaskRun, message: str) -> None:
    run.store.consoles.revoke_tokens(run.instance.uuid)
    run.ending.note = message
    _forget(run)


def _forget(run: TaskRun) -> None:
    run.store.claims.release(run.instance.uuid, task=run.task)  # a fenced worker releases nothing
    snapshots.drop_snapshot(run.store, run.instance.uuid, run.settings)  # a shelved instance's disk lives on only there
    run.ending.end_power = PowerState.NOSTATE
    run.ending.fields["deleted_at"] = run.store.clock.now()


def soft_delete(run: TaskRun) -> None:
    """Power the guest off and keep everything for a later restore or reclaim.

    A resized instance is confirmed first, as Nova's delete path does for both
    kinds of delete: a restore brings the guest back where it now lives.
    """
    _confirm_open_move(run)
    run.power_off()


def restore(run: TaskRun) -> None:
    """Power a soft-deleted guest back on (one soft-deleted while shelved no longer needs its snapshot)."""
    run.driver.power_on(run.spec)
    run.ending.after_success.append(lambda: snapshots.drop_snapshot(run.store, run.instance.uuid, run.settings))


DELETE = register(Definition(graph.operation(Op.DELETE), delete))
FORCE_DELETE = register(Definition(graph.operation(Op.FORCE_DELETE), force_delete))
SOFT_DELETE = register(Definition(graph.operation(Op.SOFT_DELETE), soft_delete))
RESTORE = register(Definition(graph.operation(Op.RESTORE), restore))
