"""Cold migrate and resize (one flow), confirm and revert, as Nova's libvirt path does them.

resize/migrate walks resize_prep (pick and claim a destination, record the
migration) -> resize_migrating (power off and set the disk aside on the
source) -> resize_migrated (the instance now belongs to the destination) ->
resize_finish (stream the disk from the source host to the destination over
their two libvirt connections, check its digest, grow it, define, power on
unless it was stopped) and ends in resized, holding claims on both hosts.
Confirm deletes the source's kept disk and releases its claim; revert
destroys the destination's copy and puts the source back as it was.

A failure before the disk left the source, or of the copy itself (the
destination then keeps nothing), is rolled back onto the source: the guest
back as it was, the destination claim released, the task failed. A failure
after the copy leaves the source disk kept (never lost) and the instance in
error. The copy records its progress on the step and stops when the task is
taken over (a force delete); recovery restarts an interrupted copy.

Besides the steps, the module registers the move's preparation (its
scheduler), its roll-back for recovery, and its guards: a resize never
shrinks the disk nor keeps the size, a migrate never targets the host the
instance is on.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from lifecycle import graph
from lifecycle.drivers.base import DomainSpec, volume_name
from lifecycle.errors import CopyFailed, DomainNotFound, DriverUnavailable, InvalidInput, LifecycleError, Preempted
from lifecycle.graph import Op
from lifecycle.logs import get_logger
from lifecycle.placement import scheduler_for
from lifecycle.records import Flavor, Migration
from lifecycle.registry import Call, Definition, flavor_param, register, target_host
from lifecycle.states import MIGRATION_TRANSITIONS, MigrationStatus, PowerState, TaskState, VmState
from lifecycle.tasks import TaskRun

__all__ = ["CONFIRM_RESIZE", "MIGRATE", "RESIZE", "REVERT_RESIZE", "revert_on_source"]

log = get_logger(__name__)

T = TaskState
MS = MigrationStatus


def _spec(run: TaskRun, flavor: Flavor, disk: str | None) -> DomainSpec:
    """Return the instance's spec with ``flavor``, on the root volume ``disk`` of the host called."""
    spec = run.spec
    return replace(spec, vcpus=flavor.vcpus, memory_mb=flavor.memory_mb, root_gb=flavor.root_gb, disk=disk)


def kept_disk(migration: Migration) -> str | None:
    """Return the source's kept root volume of a move (records from before volume names hold "<uri> <path>")."""
    if migration.source_disk is None:
        return None
    return migration.source_disk.rsplit("/", 1)[-1].rsplit(" ", 1)[-1]


def _source_disk(run: TaskRun, migration: Migration) -> str | None:
    """Return the instance's root volume on the move's source: the kept one once it left, else the recorded one."""
    kept = kept_disk(migration)
    if kept is not None:
        return kept
    return run.instance.disk if run.instance.host == migration.source_host else None


def _power_on(migration: Migration) -> bool:
    return migration.previous_vm_state is not VmState.STOPPED


def move(run: TaskRun) -> None:
    """Walk resize_prep -> resize_migrating -> resize_migrated -> resize_finish."""
    store, uuid = run.store, run.instance.uuid
    if run.resumed_past(T.RESIZE_PREP):
        migration = store.moves.open_of(uuid)
        assert migration is not None, "a move past resize_prep has a migration record"
    else:
        migration = _prepare(run)
    assert migration.dest_host is not None
    run.touched.add(migration.dest_host)  # a delete taking the move over must clean the destination too
    run.advance(T.RESIZE_MIGRATING)
    migration = _leave_source(run, migration)
    # The disk this attempt makes on the destination: what a hard reboot finds should the finish fail half-way.
    arriving = volume_name(uuid, run.attempt())
    run.advance(T.RESIZE_MIGRATED, f"moved to {migration.dest_host}", host=migration.dest_host, disk=arriving)
    run.ending.changed = True  # the guest left its source: a failure from here on cannot keep the vm_state
    run.migration_status(migration.id, MS.POST_MIGRATING)
    run.advance(T.RESIZE_FINISH)
    _copy_and_finish(run, migration)
    run.ending.fields["flavor"] = migration.new_flavor
    run.ending.fields["previous_vm_state"] = migration.previous_vm_state
    run.ending.end_power = run.read_power()  # here, so that a failure to read it is the move's (error, move open)
    run.migration_status(migration.id, MS.FINISHED, finished_at=run.store.clock.now())


def _copy_and_finish(run: TaskRun, migration: Migration) -> None:
    """Bring the disk over from the source and start the guest there; a failed copy goes back to the source."""
    kept = _source_disk(run, migration)
    source = functools.partial(run.on(migration.source_host).read_disk, run.instance.uuid, kept)
    assert migration.dest_host is not None
    spec = replace(_spec(run, migration.new_flavor, None), attempt=run.attempt(migration.id))
    run.ending.fail_fields["disk"] = volume_name(run.instance.uuid, spec.attempt)
    try:
        _clear_destination(run, migration.dest_host)
        dest = run.on(migration.dest_host)
        disk = dest.finish_migration(spec, source, power_on=_power_on(migration), progress=run.copy_progress)
        run.ending.fields["disk"] = run.ending.fail_fields["disk"] = disk
    except CopyFailed:
        back = {"host": migration.source_host, "flavor": migration.old_flavor, "previous_vm_state": None, "disk": kept}
        run.ending.fields |= back  # the power read at the failure is the source's
        run.ending.fail_fields |= back
        run.ending.changed = False  # the destination holds nothing: the guest is as it was, on its source
        # As it was before the move (a resumed run read its "before" on the destination, where nothing was).
        run.before_power = PowerState.RUNNING if _power_on(migration) else PowerState.SHUTDOWN
        revert_on_source(run, migration)
        raise


def _clear_destination(run: TaskRun, dest: str) -> None:
    """Destroy what an earlier life left on the destination; one that does not answer fails like a failed copy.

    Nothing of this move is there yet, so the move goes back onto its source.
    """
    try:
        run.clear_leftovers(dest, why="copying the disk there")
    except DriverUnavailable as exc:
        raise CopyFailed(f"destination {dest} does not answer before the copy: {exc}", call="finish_migration") from exc


def _prepare(run: TaskRun) -> Migration:
    assert run.schedule is not None and run.instance.host is not None
    # A worker stalled since its start (in the power read before its steps) whose task recovery rolled back
    # must not claim a destination nor open a move: it stops here.
    run.store.tasks.fence(run.task)
    source = run.instance.host
    dest = run.schedule([source])  # claims the new flavor on the destination
    return run.record_migration(
        "resize" if "flavor" in run.params else "migration", source, dest, new_flavor=_new_flavor(run)
    )


def _new_flavor(run: TaskRun) -> Flavor:
    """Return the flavor the move ends with: a resize's, extra specs included, or the instance's own (a migrate)."""
    return Flavor.from_dict(run.params["flavor"]) if "flavor" in run.params else run.instance.flavor


def prepare(run: TaskRun) -> None:
    """Give a move its scheduler (the destination is picked and claimed in its first step)."""
    run.schedule = scheduler_for(
        run.store,
        run.settings,
        run.instance.uuid,
        _new_flavor(run),
        run.image,
        requested_host=run.params.get("host"),
        availability_zone=None,
    )


def resize_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a resize's ``flavor`` (required); return it as :meth:`Flavor.as_dict` encodes it (extra specs too)."""
    return {**params, "flavor": flavor_param(params.get("flavor"), "a resize")}


def resize_guard(call: Call) -> None:
    """Refuse a resize that shrinks the root disk, or keeps the size (that is a migrate)."""
    current, flavor = call.instance.flavor, Flavor.from_dict(call.params["flavor"])
    if flavor.root_gb < current.root_gb:
        raise InvalidInput(f"cannot shrink the root disk from {current.root_gb} GiB to {flavor.root_gb} GiB")
    if (flavor.vcpus, flavor.memory_mb, flavor.root_gb) == (current.vcpus, current.memory_mb, current.root_gb):
        raise InvalidInput("the new flavor is the same size as the current one: use migrate")


def migrate_guard(call: Call) -> None:
    """Refuse a target host that does not exist (:class:`HostNotFound`) or is the one the instance is on."""
    host = call.params.get("host")
    if host is not None and call.store.hosts.get(host).name == call.instance.host:
        raise InvalidInput(f"cannot migrate instance {call.instance.uuid} to {host}: that is the host it is on")


def roll_back(run: TaskRun) -> None:
    """Recovery's roll-back of a move that had not left its source: back onto the source."""
    migration = run.store.moves.open_of(run.instance.uuid)
    if migration is None:
        return
    # A source that does not answer: the move stays open, the instance ends in error on it (revert_resize later).
    with contextlib.suppress(DriverUnavailable):
        revert_on_source(run, migration)


def _leave_source(run: TaskRun, migration: Migration) -> Migration:
    store = run.store
    if migration.source_disk is not None:  # resumed: the disk already left
        return migration
    run.migration_status(migration.id, MS.MIGRATING)
    try:
        disk = run.driver.migrate_disk_and_power_off(
            run.instance.uuid,
            timeout=run.settings.shutdown_timeout,
            retry_interval=run.settings.shutdown_retry_interval,
            disk=run.instance.disk,
            attempt=run.attempt(migration.id),
        )
    except Preempted:
        raise  # a delete took the move over: it confirms and cleans up, this worker writes nothing
    except Exception:  # any failure before the disk left, not only a driver's: back onto the source
        revert_on_source(run, migration)
        raise
    store.moves.update(migration.id, source_disk=disk)
    store.consoles.revoke_tokens(run.instance.uuid)
    return replace(migration, source_disk=disk)


def revert_on_source(run: TaskRun, migration: Migration) -> None:
    """Undo a move that had not left the source: source back as it was, destination claim released.

    A source that does not answer leaves the move open (the instance ends in
    error on its source, its disk kept there): ``revert_resize`` finishes it
    once the source answers, as it would never be finished by guessing now.
    """
    assert migration.dest_host is not None
    disk = _source_disk(run, migration)
    try:
        run.on(migration.source_host).finish_revert_migration(
            _spec(run, migration.old_flavor, disk), power_on=_power_on(migration)
        )
    except Preempted:
        raise
    except DriverUnavailable as exc:
        log.warning("source_restore_unreachable", host=migration.source_host, error=str(exc))
        run.ending.fail_fields |= {"host": migration.source_host, "flavor": migration.old_flavor, "disk": disk}
        run.ending.changed = True  # the guest is not back: the instance ends in error with the move open, revertible
        raise
    except Exception as exc:  # the roll back records itself whatever the source said; sync sees the guest
        log.warning("source_restore_failed", host=migration.source_host, error=f"{type(exc).__name__}: {exc}")
    run.store.claims.release(run.instance.uuid, migration.dest_host)
    run.migration_status(migration.id, MS.ERROR)


def confirm(run: TaskRun) -> None:
    """Delete the source's kept disk and release its claim; the move is final."""
    migration = run.store.moves.open_of(run.instance.uuid)
    assert migration is not None, "a resized instance has an open migration"
    confirm_on_source(run, migration)
    run.ending.fields["previous_vm_state"] = None


def confirm_on_source(run: TaskRun, migration: Migration, *, ends: MigrationStatus = MS.CONFIRMED) -> None:
    """Clean the source of a finished move (also what delete does first for a resized instance).

    The record ends ``ends``: confirmed, or error for a move a delete cut short.
    """
    run.migration_status(migration.id, MS.CONFIRMING)
    try:
        run.on(migration.source_host).confirm_migration(run.instance.uuid, kept_disk(migration))
    except LifecycleError:
        run.migration_status(migration.id, MS.FINISHED)  # retried later, never stuck
        raise
    run.store.claims.release(run.instance.uuid, migration.source_host)
    run.migration_status(migration.id, ends)


def revert(run: TaskRun) -> None:
    """Put the source back with the old flavor, as before the move, then destroy the destination's copy.

    Also from error while a failed move is open (the runner admits it only
    then): the instance goes back onto the source's kept disk, in the
    vm_state it had before the move, and the record of a move that never
    finished ends ``error``.

    The destination's guest is powered off first (never two running copies),
    but its disk and claim go only once the source is back: a restore that
    fails leaves the instance where its claim and disk still are.
    """
    migration = run.store.moves.open_of(run.instance.uuid)
    assert migration is not None and migration.dest_host is not None, "a resized instance has an open migration"
    uuid = run.instance.uuid
    # From error (a move that failed after its disk left the source, or whose roll-back could not reach it):
    # the vm_state to end in is the one before the move, which only the record holds.
    run.instance = replace(run.instance, previous_vm_state=migration.previous_vm_state)
    finished = MS.REVERTING in MIGRATION_TRANSITIONS[migration.status]  # else it never finished: it ends error
    if finished:
        run.migration_status(migration.id, MS.REVERTING)
    with contextlib.suppress(DomainNotFound):
        run.on(migration.dest_host).power_off(uuid, timeout=0, retry_interval=0)
    kept = _source_disk(run, migration)
    run.on(migration.source_host).finish_revert_migration(
        _spec(run, migration.old_flavor, kept), power_on=_power_on(migration)
    )
    back = {"host": migration.source_host, "flavor": migration.old_flavor, "previous_vm_state": None, "disk": kept}
    run.ending.fail_fields |= back  # from here on the guest lives on the source, whatever fails next
    run.store.consoles.revoke_tokens(uuid)
    run.store.claims.release(uuid, migration.dest_host)
    run.on(migration.dest_host).destroy(uuid, destroy_disks=True)
    run.ending.fields |= back
    run.migration_status(migration.id, MS.REVERTED if finished else MS.ERROR)


_ROLL_BACK_IN = {
    # A move that had not finished leaving the source goes back to it (Nova's init_host does
    # finish_revert_migration for resize_migrating); the destination claim is released.
    TaskState.RESIZE_PREP: "crashed while preparing the move: the source is untouched",
    TaskState.RESIZE_MIGRATING: "crashed while the disk was leaving the source: put back on the source",
}

RESIZE = register(
    Definition(
        graph.operation(Op.RESIZE),
        move,
        prepare=prepare,
        roll_back=roll_back,
        roll_back_in=_ROLL_BACK_IN,
        guard=resize_guard,
        params=resize_params,
    )
)
MIGRATE = register(
    Definition(
        graph.operation(Op.MIGRATE),
        move,
        prepare=prepare,
        roll_back=roll_back,
        roll_back_in=_ROLL_BACK_IN,
        guard=migrate_guard,
        params=target_host,
    )
)
CONFIRM_RESIZE = register(Definition(graph.operation(Op.CONFIRM_RESIZE), confirm))
REVERT_RESIZE = register(Definition(graph.operation(Op.REVERT_RESIZE), revert))
