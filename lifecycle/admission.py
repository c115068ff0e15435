"""What an instance's host, open move and lock leave an operation, beyond the table's guard.

The table (:mod:`lifecycle.graph`) says which (vm_state, task_state) pairs an
operation starts from; the runner then asks this module about the rest of
the row as it is now, and about the operation's row data, never its name:

- a locked instance refuses what the API starts without an override
  (:func:`refuse_if_locked`), when the lock applies to the operation;
- an instance without a host, or in error with a failed move still open,
  allows only the operations that need no host (a delete), and a move's
  revert back onto the source when that source kept its disk;
- an operation from error or soft_deleted (where the instance may hold no
  claim on its host) that leaves it using its room there holds its claim
  first: :func:`admit` returns the claim the task's first write takes.
"""

from __future__ import annotations

from typing import NoReturn

from lifecycle import graph
from lifecycle.config import Settings
from lifecycle.errors import InstanceLocked, InvalidState
from lifecycle.operations import revertible
from lifecycle.records import Cause, Instance, Migration
from lifecycle.states import VmState
from lifecycle.store import Store
from lifecycle.store.claims import Hold

__all__ = ["admit", "locked", "refuse_if_locked"]

_CLAIM_FROM = frozenset({VmState.ERROR, VmState.SOFT_DELETED})
"""vm_states whose instance may hold no claim on its host (a failed delete released it): any other operation from
them makes sure it holds one first, so that bringing it back never overcommits the host."""
_NO_HOST = "the instance has no host (it was never built, or its host was removed)"


def refuse_if_locked(operation: str, instance: Instance, cause: Cause, override_lock: bool) -> None:
    """Raise :class:`InstanceLocked` when an API call without an override meets a locked instance."""
    if instance.locked_by is not None and cause is Cause.API and not override_lock:
        raise locked(operation, instance)


def locked(operation: str, instance: Instance) -> InstanceLocked:
    """Return the error refusing ``operation`` on the locked ``instance``, naming who locked it, when and why."""
    assert instance.locked_by is not None
    at = instance.locked_at.isoformat(timespec="seconds") if instance.locked_at else "an unknown time"
    return InstanceLocked(operation, instance.uuid, instance.locked_by, instance.locked_reason, at)


def admit(store: Store, settings: Settings, op: graph.Operation, instance: Instance, cause: Cause) -> Hold | None:
    """Refuse what the instance's host and open move leave impossible; return the claim it must hold first.

    An instance without a host, or in error with a move still open, allows
    only what needs no host (delete; and, for a move whose source kept its
    disk, what reverts a move: back onto the source). An operation from
    error or soft_deleted that leaves the instance using its room on its
    host must hold its claim there (taken in the task's first write, or
    :class:`NoValidHost` and nothing written).
    """
    if not op.needs_host:
        return None
    if instance.host is None and instance.vm_state is not VmState.SHELVED_OFFLOADED:
        _refuse(op, instance, f"{_NO_HOST}: only {_hostless()} are possible")
    migration = store.moves.open_of(instance.uuid) if instance.vm_state is VmState.ERROR else None
    reverting = op.reverts_move and instance.vm_state is VmState.ERROR
    if migration is not None and not (reverting and revertible(migration)):
        _refuse(op, instance, _failed_move(migration))
    if reverting and migration is None:
        _refuse(op, instance, "no move of this instance is open: there is nothing to revert")
    if reverting and cause is Cause.TIMER:
        _refuse(op, instance, "a move that failed is reverted by an operator, never by a timer")
    if instance.vm_state not in _CLAIM_FROM or not op.holds_room or instance.host is None:
        return None
    # The host it lives on afterwards, with the flavor it has there: a revert's is the move's source.
    host, flavor = (
        (migration.source_host, migration.old_flavor) if migration is not None else (instance.host, instance.flavor)
    )
    s = settings.scheduler
    ratios = (s.cpu_allocation_ratio, s.ram_allocation_ratio, s.disk_allocation_ratio)
    return Hold(host, (flavor.vcpus, flavor.memory_mb, flavor.root_gb), ratios)


def _refuse(op: graph.Operation, instance: Instance, reason: str) -> NoReturn:
    raise InvalidState(
        op.name,
        instance.uuid,
        instance.vm_state,
        instance.task_state,
        op.allowed_vm_states,
        op.allowed_task_states,
        reason=reason,
    )


def _hostless() -> str:
    """Name what is always left: the operations that need no host (delete and force_delete)."""
    return " and ".join(op.name for op in graph.rows() if not op.needs_host)


def _failed_move(migration: Migration) -> str:
    """Say what is left for an error instance whose move ``migration`` is still open."""
    where = f"{migration.source_host} -> {migration.dest_host}"
    left = f"{_hostless()} are possible"
    if revertible(migration):
        back = f"back onto {migration.source_host}, on the disk it kept, as before the move"
        reverts = ", ".join(op.name for op in graph.rows() if op.reverts_move)
        left = f"{reverts} ({back}), {left}"
    return f"a move of this instance failed half-way and is still open ({migration.status.value}, {where}): only {left}"
