"""Evacuate: rebuild an instance of a dead host on another host, from its image (Nova's evacuate).

The walk is rebuild's: ``rebuilding`` (the scheduler picks and claims a
destination other than the dead host; an ``evacuation`` migration record is
written), ``rebuild_block_device_mapping`` (the instance now belongs to the
destination; the dead host's claim is released), ``rebuild_spawning`` (a fresh
disk from the instance's image, the domain defined and started, powered off
again when the instance was stopped). The instance keeps its uuid, name,
flavor and image; whatever its disk on the dead host held is lost.

Only an instance whose host is down (no heartbeat for ``host_down_after``)
*and* fenced by an operator may be evacuated (:func:`check_evacuable`, the
one such check, run by :func:`guard` before the task starts): a host that is merely silent may still run the guest, and
two copies writing the same volumes is the disaster evacuate must not cause.
The dead host's old copy is destroyed when it answers again
(:mod:`lifecycle.evacuation`), and the record then goes ``completed``.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from datetime import datetime

from lifecycle import graph
from lifecycle.drivers.base import volume_name
from lifecycle.errors import HostNotEvacuable, InvalidInput, Preempted
from lifecycle.graph import DATA_LOSS, Op
from lifecycle.placement import host_is_up, scheduler_for
from lifecycle.records import Host, Migration
from lifecycle.registry import Call, Definition, register, target_host
from lifecycle.states import MigrationStatus, TaskState, VmState
from lifecycle.store.moves import EVACUATION
from lifecycle.tasks import TaskRun

__all__ = ["EVACUATE", "check_evacuable", "guard"]

T = TaskState
MS = MigrationStatus


def check_evacuable(host: Host, down_after: float, uuid: str | None = None, *, now: datetime) -> None:
    """Raise :class:`HostNotEvacuable`, naming each failing condition, unless ``host`` is down at ``now`` and fenced."""
    down = not host_is_up(host, down_after, now=now)
    if not (down and host.fenced):
        raise HostNotEvacuable(host.name, down=down, fenced=host.fenced, uuid=uuid)


def guard(call: Call) -> None:
    """Refuse a target host that does not exist or is the instance's own, then unless its host is down and fenced."""
    instance, dest = call.instance, call.params.get("host")
    if dest is not None and call.store.hosts.get(dest).name == instance.host:
        raise InvalidInput(f"cannot evacuate instance {instance.uuid} to {dest}: that is the host it is on")
    if instance.host is None:
        return  # the runner refuses a host-less instance itself: only a delete is left for it
    check_evacuable(
        call.store.hosts.get(instance.host), call.settings.host_down_after, instance.uuid, now=call.store.clock.now()
    )


def prepare(run: TaskRun) -> None:
    """Give the evacuation its scheduler (the destination is picked and claimed in its first step)."""
    run.schedule = scheduler_for(
        run.store,
        run.settings,
        run.instance.uuid,
        run.instance.flavor,
        run.image,
        requested_host=run.params.get("host"),
        availability_zone=None,
    )


def evacuate(run: TaskRun) -> None:
    """Walk rebuilding -> rebuild_block_device_mapping -> rebuild_spawning onto a new host.

    Resumed after a crash, the run finds its own migration record (and so
    its destination) again; spawn is repeat-safe.
    """
    migration = run.store.moves.of_task(run.task.id) or _record(run)
    dest = migration.dest_host
    assert dest is not None
    run.touched.add(dest)  # a delete taking the evacuation over must clean the destination too
    try:
        _rebuild_on(run, migration, dest)
    except Preempted:
        with contextlib.suppress(Exception):  # the preemptor owns the instance; the record only says it ended
            run.store.moves.update(migration.id, status=MS.ERROR)
        raise
    except Exception:
        if run.instance.host != dest:  # never left the dead host: the destination's room goes back
            run.store.claims.release(run.instance.uuid, dest)
        run.migration_status(migration.id, MS.ERROR)
        raise
    run.migration_status(migration.id, MS.DONE, finished_at=run.store.clock.now())


def _record(run: TaskRun) -> Migration:
    """Pick and claim a destination (not the dead host) and write the evacuation's record."""
    assert run.schedule is not None and run.instance.host is not None
    run.store.tasks.fence(run.task)  # a worker taken over since its start claims nothing
    source, uuid = run.instance.host, run.instance.uuid
    for held in run.store.claims.of(uuid):  # a crash between a claim and its record left this one behind
        if held != source:
            run.store.claims.release(uuid, held)
    dest = run.schedule([source])
    return run.record_migration(EVACUATION, source, dest)


def _rebuild_on(run: TaskRun, migration: Migration, dest: str) -> None:
    source, uuid = migration.source_host, run.instance.uuid
    message = f"evacuated from {source} (down and fenced) to {dest}, image {run.image.name}: {DATA_LOSS}"
    # The disk this attempt makes there: what a hard reboot finds should the spawn fail half-way.
    run.advance(T.REBUILD_BLOCK_DEVICE_MAPPING, message, host=dest, disk=volume_name(uuid, run.attempt()))
    run.ending.changed = True  # the instance left its host: a failure from here on ends in error
    run.store.claims.release(uuid, source)
    run.store.consoles.revoke_tokens(uuid)
    run.advance(T.REBUILD_SPAWNING)
    # An earlier life's copy on the destination (evacuated away from it once) is destroyed first, never started.
    run.clear_leftovers(dest, why="rebuilding the evacuated instance")
    run.ending.fields["disk"] = run.driver.spawn(replace(run.spec, disk=None), power_on=True)
    if run.source_vm_state is VmState.STOPPED:
        run.power_off(timeout=0)


EVACUATE = register(
    Definition(graph.operation(Op.EVACUATE), evacuate, prepare=prepare, guard=guard, params=target_host)
)
