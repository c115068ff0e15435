"""The steps of each operation, one module per intent family.

``STEPS`` maps an operation name from the graph to the function that walks it.
Each function is called after the task's first task_state is written and
before its end state is; it calls ``run.advance(TaskState.X)`` to enter each further
task_state of the walk and does the driver work of each step.
"""

from __future__ import annotations

from lifecycle.operations import build, delete, move, power, rebuild
from lifecycle.tasks import Steps

__all__ = ["STEPS"]

STEPS: dict[str, Steps] = {**build.STEPS, **power.STEPS, **delete.STEPS, **rebuild.STEPS, **move.STEPS}
