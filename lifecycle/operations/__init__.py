"""The steps of each operation, one module per intent family.

``STEPS`` maps an operation name from the graph to the function that walks it.
Each function is called after the task's first task_state is written and
before its end state is; it calls ``run.advance(TaskState.X)`` to enter each further
task_state of the walk and does the driver work of each step.

Beside the steps, an operation may register hooks: ``PREPARE`` runs when its
task is started or resumed (a move gets its scheduler), ``ROLL_BACK`` when
recovery ends a crashed task failed instead of resuming it (a build gives
its claim back, a move goes back onto its source).
"""

from __future__ import annotations

from lifecycle.operations import build, delete, move, power, rebuild
from lifecycle.tasks import Hook, Steps

__all__ = ["PREPARE", "ROLL_BACK", "STEPS"]

STEPS: dict[str, Steps] = {**build.STEPS, **power.STEPS, **delete.STEPS, **rebuild.STEPS, **move.STEPS}
PREPARE: dict[str, Hook] = {**move.PREPARE}
ROLL_BACK: dict[str, Hook] = {**build.ROLL_BACK, **move.ROLL_BACK}
