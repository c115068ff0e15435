"""The steps of each operation, one module per intent family.

``STEPS`` maps an operation name from the graph to the function that walks it.
Each function is called after the task's first task_state is written and
before its end state is; it calls ``run.advance(TaskState.X)`` to enter each further
task_state of the walk and does the driver work of each step.

Beside the steps, an operation may register hooks: ``PREPARE`` runs when its
task is started or resumed (a move gets its scheduler), ``ROLL_BACK`` when
recovery ends a crashed task failed instead of resuming it (a build gives
its claim back, a move goes back onto its source). ``GUARDS`` holds checks
beyond the table's guard, run before the task starts (evacuate needs its
host down and fenced).

``revert_resize`` is the move module's revert, also from error while a failed
move is still open (:func:`revertible`): :func:`revert_resize` supplies what
such a move's record holds and the instance does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from lifecycle.config import Settings
from lifecycle.operations import build, delete, evacuate, move, power, rebuild, shelve
from lifecycle.records import Instance, Migration
from lifecycle.states import MIGRATION_TRANSITIONS, MigrationStatus, VmState
from lifecycle.store import Store
from lifecycle.tasks import Hook, Steps, TaskRun

__all__ = ["GUARDS", "PREPARE", "ROLL_BACK", "STEPS", "revert_resize", "revertible"]

MS = MigrationStatus


def revertible(migration: Migration | None) -> bool:
    """Whether ``revert_resize`` may put an error instance back onto the source of its open move ``migration``.

    The move must still be open and not being confirmed: a confirm may have
    deleted the source's kept disk already, so only delete is left then.
    """
    return (
        migration is not None
        and migration.status.open
        and migration.dest_host is not None
        and migration.status is not MS.CONFIRMING
    )


def revert_resize(run: TaskRun) -> None:
    """Revert a move: from resized as :func:`move.revert` does, and from error while the failed move is open.

    A move that failed after its disk left the source ended in error without
    what a resized instance carries, so two things are supplied before the
    revert runs: the vm_state to end in (before the move: active or stopped),
    which only the migration record holds; and, for a move that never
    finished, its record's statuses: it cannot be ``reverting`` nor
    ``reverted`` (:data:`MIGRATION_TRANSITIONS`), so it goes to ``error`` once
    the source is back, as the roll back of a failed copy ends it.
    """
    migration = run.store.open_migration(run.instance.uuid)
    if run.source_vm_state is VmState.ERROR and migration is not None:
        # In memory only: the end state reads it (Result.PREVIOUS); the end write clears the column either way.
        run.instance = replace(run.instance, previous_vm_state=migration.previous_vm_state)
        if MS.REVERTING not in MIGRATION_TRANSITIONS[migration.status] | {migration.status}:
            run.migration_status = _unfinished_move(run.migration_status)  # type: ignore[method-assign]
    move.revert(run)


def _unfinished_move(write: Callable[..., None]) -> Callable[..., None]:
    """Write a revert's statuses for a move that never finished: no ``reverting``, and ``error`` for ``reverted``."""

    def status(migration_id: str, status: MigrationStatus, **values: Any) -> None:
        if status is MS.REVERTING:
            return
        write(migration_id, MS.ERROR if status is MS.REVERTED else status, **values)

    return status


STEPS: dict[str, Steps] = {
    **build.STEPS,
    **power.STEPS,
    **delete.STEPS,
    **rebuild.STEPS,
    **move.STEPS,
    **evacuate.STEPS,
    **shelve.STEPS,
    "revert_resize": revert_resize,
}
PREPARE: dict[str, Hook] = {**move.PREPARE, **evacuate.PREPARE, **shelve.PREPARE}
GUARDS: dict[str, Callable[[Store, Settings, Instance], None]] = {**evacuate.GUARDS, **shelve.GUARDS}
ROLL_BACK: dict[str, Hook] = {**build.ROLL_BACK, **move.ROLL_BACK}
