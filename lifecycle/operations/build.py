"""Create: schedule (a named host for now), network, disk mapping, spawn."""

from __future__ import annotations

from lifecycle.store.db import now
from lifecycle.tasks import Steps, TaskRun

__all__ = ["STEPS"]


def create(run: TaskRun) -> None:
    """Walk scheduling -> networking -> block_device_mapping -> spawning, then boot."""
    # scheduling: the host was named by the caller and checked before the task began.
    run.advance()  # networking: instances have no network interface yet
    run.advance()  # block_device_mapping: the root disk is made by spawn
    run.advance()  # spawning
    run.driver.spawn(run.spec, power_on=True)
    run.fields["launched_at"] = now()


STEPS: dict[str, Steps] = {"create": create}
