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
move is still open (:func:`revertible`).
"""

from __future__ import annotations

from collections.abc import Callable

from lifecycle.config import Settings
from lifecycle.operations import build, delete, evacuate, move, power, rebuild, shelve
from lifecycle.records import Instance, Migration
from lifecycle.states import MigrationStatus
from lifecycle.store import Store
from lifecycle.tasks import Hook, Steps

__all__ = ["GUARDS", "PREPARE", "ROLL_BACK", "STEPS", "revertible"]

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


STEPS: dict[str, Steps] = {
    **build.STEPS,
    **power.STEPS,
    **delete.STEPS,
    **rebuild.STEPS,
    **move.STEPS,
    **evacuate.STEPS,
    **shelve.STEPS,
}
PREPARE: dict[str, Hook] = {**move.PREPARE, **evacuate.PREPARE, **shelve.PREPARE}
GUARDS: dict[str, Callable[[Store, Settings, Instance], None]] = {**evacuate.GUARDS, **shelve.GUARDS}
ROLL_BACK: dict[str, Hook] = {**build.ROLL_BACK, **move.ROLL_BACK}
