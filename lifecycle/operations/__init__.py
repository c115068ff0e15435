"""The steps of each operation, one module per intent family, each registering its operations' definitions.

Each module makes a :class:`lifecycle.registry.Definition` per operation
(pointing at its row of :mod:`lifecycle.graph`) and registers it when
imported. Its steps function is called after the task's first task_state is
written and before its end state is; it calls ``run.advance(TaskState.X)``
to enter each further task_state of the walk and does the driver work of
each step. Beside the steps, a definition may carry a preparation (run when
the task is started or resumed: a move gets its scheduler), a roll-back
(run when recovery ends a crashed task failed instead of resuming it: a
build gives its claim back, a move goes back onto its source), an extra
guard (evacuate needs its host down and fenced) and a parameter schema.

Importing this package registers them all, and checks that every row of the
table has its definition. :func:`definition` finds one by name.

``revert_resize`` is the move module's revert, also from error while a failed
move is still open (:func:`revertible`).
"""

from __future__ import annotations

from lifecycle import graph
from lifecycle.errors import InvalidInput
from lifecycle.operations import build, delete, evacuate, move, power, rebuild, shelve
from lifecycle.records import Migration
from lifecycle.registry import Definition, definitions, find
from lifecycle.states import MigrationStatus

__all__ = ["definition", "revertible"]

MS = MigrationStatus

_MODULES = (build, delete, evacuate, move, power, rebuild, shelve)
_UNDEFINED = sorted(op.name for op in graph.OPERATIONS if find(op.name) is None)
if _UNDEFINED:  # a row without its module's definition is a definition error, found at import
    raise AssertionError(f"operations without a definition in lifecycle/operations: {', '.join(_UNDEFINED)}")


def definition(name: object) -> Definition:
    """Return the definition of operation ``name``; :class:`InvalidInput` names the known ones otherwise."""
    found = find(name)
    if found is None:
        known = ", ".join(d.name for d in definitions())
        raise InvalidInput(f"unknown operation {name!r}; available: {known}")
    return found


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
