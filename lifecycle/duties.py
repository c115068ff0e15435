"""Operator duties: reclaim, build timeout, shelved offload, reset-state, lock and unlock.

These are what Nova operators rely on every week and what, missing, pushes
operators of its peers to edit the database by hand:

- **reclaim** (Nova's ``_reclaim_queued_deletes``): with
  ``reclaim_instance_interval`` > 0 a delete is a soft delete; once an
  instance has been soft-deleted for that long the daemon deletes it for
  good (a ``delete`` task, cause ``timer``). ``restore`` works until then.
- **build timeout** (Nova's ``_check_instance_build_time``): a build still
  running after ``instance_build_timeout`` seconds ends failed and the
  instance goes to error (cause ``timer``).
- **shelved offload** (Nova's ``_poll_shelved_instances``): an instance shelved
  on its host for ``shelved_offload_time`` seconds is offloaded (a
  ``shelve_offload`` task, cause ``timer``); with the setting at 0 a shelve
  offloads at once, and the duty offloads what an unreachable host kept.
- **console token purge**: console tokens revoked (by a delete or a move),
  and those expired for more than an hour (:data:`lifecycle.console.EXPIRED_GRACE`),
  are deleted: neither can ever open a console again.
- **reset-state** (Nova's ``nova reset-state``): the one supported way out of
  a stuck task. The running task ends failed with cause ``admin`` and its
  worker is fenced (it stops before its next hypervisor call or write); the
  task_state is cleared and the vm_state set (error, or active); who and why
  are in the audit row and the task's error. The next sync pass brings the
  power state in line. An unshelve of an offloaded instance goes back to
  ``shelved_offloaded`` instead (its disk is in its snapshot, which only an
  unshelve can use): no host, no claim, and what its spawn left on the host
  is destroyed there by the host's daemon. An instance with an open move is
  refused, saying what can end the move.
- **lock / unlock** (Nova's ``locked_by``): a locked instance refuses every
  operation started by the API, naming who locked it, when and why, unless
  the caller overrides the lock (an admin); sync, events, recovery and the
  timer duties are never blocked by a lock. Only the locker, or an override,
  unlocks.

Every change is one compare-and-swap with its audit row.
"""

from __future__ import annotations

import enum
import uuid as uuidlib
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

from lifecycle import console, validation
from lifecycle.admission import locked
from lifecycle.audit import Activity, Why
from lifecycle.errors import Conflict, InvalidInput, InvalidState, LifecycleError
from lifecycle.graph import Op
from lifecycle.logs import get_logger
from lifecycle.operations import revertible
from lifecycle.records import Cause, Image, Instance, Migration
from lifecycle.snapshots import snapshot_of
from lifecycle.states import MigrationStatus, PowerState, VmState
from lifecycle.store.claims import Hold
from lifecycle.store.moves import EVACUATION

if TYPE_CHECKING:
    from lifecycle.context import Context

__all__ = [
    "RESET_STATES",
    "DutyOutcome",
    "DutyResult",
    "check_build_timeouts",
    "lock",
    "offload_shelved",
    "purge_console_tokens",
    "reclaim",
    "reset_state",
    "unlock",
]

log = get_logger(__name__)

RESET_STATES = (VmState.ERROR, VmState.ACTIVE)
"""The vm_states reset-state may set, as Nova's (``--active``, default error)."""


class DutyOutcome(enum.StrEnum):
    """What a periodic duty did to one instance (its text is what the CLI shows)."""

    DELETED = "deleted"
    OFFLOADED = "offloaded"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    """It changed meanwhile (restored, unshelved, taken by another task)."""
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DutyResult:
    """What a periodic duty did to one instance."""

    uuid: str
    outcome: DutyOutcome
    detail: str | None = None


def reclaim(ctx: Context, interval: float | None = None) -> list[DutyResult]:
    """Delete for good the instances soft-deleted longer ago than ``interval`` seconds (0: all of them).

    Without ``interval``, the setting ``reclaim_instance_interval`` (0 there
    means the duty is off). An instance restored (or being restored) meanwhile
    is skipped: the delete starts only on an idle soft-deleted instance.
    """
    if interval is None and ctx.settings.reclaim_instance_interval <= 0:
        return []
    seconds = ctx.settings.reclaim_instance_interval if interval is None else validation.seconds("interval", interval)
    return _start_on_idle(ctx, Op.DELETE, VmState.SOFT_DELETED, seconds, "reclaim", DutyOutcome.DELETED)


def offload_shelved(ctx: Context, older_than: float | None = None) -> list[DutyResult]:
    """Offload the instances shelved (on their host) longer ago than ``older_than`` seconds.

    Nova's ``_poll_shelved_instances``. Without ``older_than``, the setting
    ``shelved_offload_time``; with it at 0 a shelve offloads at once, and
    this catches a shelve whose offload could not reach its host; -1 turns it off. A shelved
    instance being unshelved meanwhile is skipped (the offload starts only on
    an idle shelved instance).
    """
    if older_than is None and ctx.settings.shelved_offload_time < 0:
        return []  # -1: never (Nova)
    seconds = ctx.settings.shelved_offload_time if older_than is None else validation.seconds("older_than", older_than)
    return _start_on_idle(ctx, Op.SHELVE_OFFLOAD, VmState.SHELVED, seconds, "shelved_offload", DutyOutcome.OFFLOADED)


def _start_on_idle(
    ctx: Context, operation: Op, vm_state: VmState, seconds: float, duty: str, done: DutyOutcome
) -> list[DutyResult]:
    """Start ``operation`` (cause timer) on each instance idle in ``vm_state`` since ``seconds`` ago, one by one.

    One that changed meanwhile (restored, unshelved, taken by another task) is
    skipped; one whose task fails (its host does not answer) is reported
    failed, and the next run of the duty tries it again.
    """
    results = []
    for instance in ctx.store.instances.in_state_since(vm_state, ctx.clock.now() - timedelta(seconds=seconds)):
        try:
            ctx.runner.start(operation, instance.uuid, actor=f"timer:{duty}", cause=Cause.TIMER, only_idle_in=vm_state)
            results.append(DutyResult(instance.uuid, done))
        except (Conflict, InvalidInput, InvalidState) as exc:
            results.append(DutyResult(instance.uuid, DutyOutcome.SKIPPED, str(exc)))
        except LifecycleError as exc:
            log.warning(f"{duty}_failed", instance_uuid=instance.uuid, error=str(exc))
            results.append(DutyResult(instance.uuid, DutyOutcome.FAILED, f"{type(exc).__name__}: {exc}"))
    return results


def purge_console_tokens(ctx: Context, grace: float | None = None) -> int:
    """Delete the revoked console tokens and those expired more than ``grace`` seconds ago; return how many.

    Without ``grace``, :data:`lifecycle.console.EXPIRED_GRACE` (an hour).
    """
    seconds = console.EXPIRED_GRACE if grace is None else validation.seconds("grace", grace)
    return console.purge(ctx.store, grace=seconds)


def check_build_timeouts(ctx: Context, timeout: float | None = None) -> list[DutyResult]:
    """End failed the builds running longer than ``timeout`` seconds (0: every running build); instances to error.

    Without ``timeout``, the setting ``instance_build_timeout`` (0 there means off).
    """
    if timeout is None and ctx.settings.instance_build_timeout <= 0:
        return []
    seconds = ctx.settings.instance_build_timeout if timeout is None else validation.seconds("timeout", timeout)
    results = []
    for instance in ctx.store.instances.building_since(ctx.clock.now() - timedelta(seconds=seconds)):
        why = Why(
            actor="timer:build_timeout",
            cause=Cause.TIMER,
            operation=Activity.BUILD_TIMEOUT,
            task_id=instance.task_id,
            message=f"build still running after {seconds:g} s (instance_build_timeout)",
        )
        try:
            ctx.store.writes.reset_state(instance, VmState.ERROR, why)
            results.append(DutyResult(instance.uuid, DutyOutcome.TIMED_OUT))
        except Conflict as exc:  # it finished (or moved on) meanwhile
            results.append(DutyResult(instance.uuid, DutyOutcome.SKIPPED, str(exc)))
    return results


def reset_state(ctx: Context, uuid: str, *, state: VmState, reason: str, actor: str) -> Instance:
    """End the instance's running task failed (cause admin), clear its task_state, set ``state``.

    An instance being unshelved from ``shelved_offloaded`` goes back there
    instead (see :func:`_back_to_offloaded`); one with an open move is
    refused, saying what can end the move. Set active, an instance on a host
    holds its claim there (taken if missing; :class:`NoValidHost` and
    nothing written when the host has no room).
    """
    uuid = validation.uuid(uuid)
    if not isinstance(state, VmState) or state not in RESET_STATES:
        allowed = ", ".join(s.value for s in RESET_STATES)
        raise InvalidInput(f"reset-state sets vm_state {allowed}, not {getattr(state, 'value', state)!r}")
    reason = _reason(reason)
    validation.name("actor", actor)
    instance = ctx.store.instances.get(uuid)
    if instance.vm_state is VmState.DELETED:
        raise InvalidInput(f"instance {uuid} is deleted: there is nothing to reset")
    move = ctx.store.moves.open_of(uuid)
    if move is not None:  # its disk may be on either host, its claims on both: only the move's own ends place it
        raise InvalidInput(_open_move(instance, move))
    why = Why(actor=actor, cause=Cause.ADMIN, operation=Activity.RESET_STATE, task_id=instance.task_id, message=reason)
    if instance.vm_state is VmState.SHELVED_OFFLOADED and instance.task_id is not None:
        snapshot = snapshot_of(ctx.store, uuid)
        if snapshot is not None and ctx.store.tasks.get(instance.task_id).operation == Op.UNSHELVE:
            return _back_to_offloaded(ctx, instance, snapshot, state, why)
    claim = None
    if state is VmState.ACTIVE and instance.host is not None:
        s, flavor = ctx.settings.scheduler, instance.flavor
        ratios = (s.cpu_allocation_ratio, s.ram_allocation_ratio, s.disk_allocation_ratio)
        claim = Hold(instance.host, (flavor.vcpus, flavor.memory_mb, flavor.root_gb), ratios)
    return ctx.store.writes.reset_state(instance, state, why, claim=claim)


def _open_move(instance: Instance, move: Migration) -> str:
    """Say why reset-state refuses an instance with an open move, and what can end the move from where it is."""
    head = (
        f"instance {instance.uuid} has an open move (migration {move.id}, {move.status.value},"
        f" {move.source_host} -> {move.dest_host}): reset-state cannot say where it is; "
    )
    if instance.task_state is not None:
        return head + (
            f"let its running task ({instance.task_state.value}) end (`lifecycle recover` finishes one whose engine"
            " died), or delete it: delete and force-delete take over any task"
        )
    if instance.vm_state is VmState.RESIZED:
        return head + "confirm-resize or revert-resize it"
    if instance.vm_state is VmState.ERROR and revertible(move):
        return head + (
            f"the move failed: revert-resize puts it back on {move.source_host} with the disk kept there, as it was"
            " before the move; or delete it"
        )
    return head + "delete it (the delete confirms the move first): nothing else can end this move"


def _back_to_offloaded(ctx: Context, instance: Instance, snapshot: Image, state: VmState, why: Why) -> Instance:
    """End an unshelve of an offloaded instance back in ``shelved_offloaded``: snapshot kept, no host, no claim.

    Its disk lives on only in the snapshot, which only an unshelve can use:
    error (or active) would leave it where no operation but delete reaches
    it. A spawn begun on a host is left to that host's daemon: an
    ``evacuation`` record from there to nowhere makes it destroy what the
    spawn left (domain and disk, never started), as after an offload from a
    dead host.
    """
    uuid, host = instance.uuid, instance.host
    if state is not VmState.ERROR:
        raise InvalidInput(
            f"instance {uuid} is being unshelved from its snapshot {snapshot.name}: reset-state returns it to"
            f" shelved_offloaded (no guest of it is known to run), not {state.value}; reset it without --state"
        )
    note = f"unshelve ended: back to shelved_offloaded, the disk kept in {snapshot.name}, claims released"
    leftover = None
    if host is not None:
        assert instance.task_id is not None
        note += (
            f"; whatever the spawn left on {host} is a leftover, destroyed there (never started) by {host}'s daemon"
            " as it destroys evacuated copies"
        )
        at = ctx.clock.now()
        leftover = Migration(
            id=str(uuidlib.uuid4()),
            instance_uuid=uuid,
            task_id=instance.task_id,
            kind=EVACUATION,
            source_host=host,
            dest_host=None,
            old_flavor=instance.flavor,
            new_flavor=instance.flavor,
            status=MigrationStatus.DONE,
            previous_vm_state=VmState.SHELVED_OFFLOADED,
            source_disk=None,
            created_at=at,
            updated_at=at,
            finished_at=at,
        )
    why = replace(why, message=f"{why.message} ({note})")
    return ctx.store.writes.reset_state(
        instance,
        VmState.SHELVED_OFFLOADED,
        why,
        release_claims=True,
        leftover=leftover,
        host=None,
        power_state=PowerState.NOSTATE,
    )


def lock(ctx: Context, uuid: str, *, reason: str, actor: str) -> Instance:
    """Lock an instance for ``actor`` with ``reason``; locking a locked one is refused (it names the lock)."""
    uuid = validation.uuid(uuid)
    reason = _reason(reason)
    validation.name("actor", actor)
    instance = ctx.store.instances.get(uuid)
    if instance.locked_by is not None:
        raise locked("lock", instance)
    why = Why(actor=actor, cause=Cause.API, operation=Activity.LOCK, message=f"locked: {reason}")
    return ctx.store.writes.set_lock(instance, actor, reason, why)


def unlock(ctx: Context, uuid: str, *, actor: str, override_lock: bool = False) -> Instance:
    """Unlock an instance: its locker may, anyone with ``override_lock`` (an admin) may; unlocked is a no-op."""
    if not isinstance(override_lock, bool):
        raise InvalidInput(f"override_lock must be True or False, got {override_lock!r}")
    uuid = validation.uuid(uuid)
    validation.name("actor", actor)
    instance = ctx.store.instances.get(uuid)
    if instance.locked_by is None:
        return instance
    if instance.locked_by != actor and not override_lock:
        raise locked("unlock", instance)
    message = f"unlocked (was locked by {instance.locked_by}: {instance.locked_reason})"
    why = Why(
        actor=actor, cause=Cause.ADMIN if override_lock else Cause.API, operation=Activity.UNLOCK, message=message
    )
    return ctx.store.writes.set_lock(instance, None, None, why)


def _reason(reason: object) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("a reason is required: say why, for whoever reads the audit log")
    text = reason.strip()
    if len(text) > 1000 or any(ord(c) < 32 and c not in "\t" for c in text):
        raise InvalidInput("the reason must be one line of at most 1000 characters")
    return text
