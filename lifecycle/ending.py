"""How a task's run ends: what its steps leave for the last write, then what that end was.

A :class:`lifecycle.tasks.TaskRun` carries one :class:`Ending`. The
operation's steps fill its first part (the columns a success or a failure
writes, the power to record, the audit note, whether the guest changed beyond
undoing, the clean-ups a success allows); the run's end records its second
part once (succeeded, failed with its error, or preempted by whom), and the
task record and the ``operation_finished`` log line are read from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lifecycle.records import Outcome
from lifecycle.states import PowerState

__all__ = ["Ending"]


@dataclass(slots=True)
class Ending:
    """What a task's last write sets, as its steps decide it, and the end once written."""

    fields: dict[str, Any] = field(default_factory=dict)
    """Extra instance columns a success writes (launched_at, deleted_at, ...)."""
    fail_fields: dict[str, Any] = field(default_factory=dict)
    """Extra instance columns a failure writes (e.g. a failed build forgets its host)."""
    end_power: PowerState | None = None
    """Power to record at a success instead of reading it (a destroyed domain)."""
    note: str | None = None
    """What a success's audit row should say (e.g. a delete done in the database only)."""
    changed: bool = False
    """Set once the task changed the instance beyond undoing (a move left its source, a delete
    confirmed a move): a failure then ends in error instead of keeping the vm_state."""
    after_success: list[Callable[[], object]] = field(default_factory=list)
    """Clean-ups that may run only once the task's success is written (an unshelve deletes its snapshot):
    a worker taken over or crashed before that write never runs them; each runs at most once, best effort."""
    outcome: Outcome | None = None
    """How the run ended (None while it runs): recorded once, by :meth:`record`."""
    error: str | None = None
    """A failure's message (``Type: text``)."""
    trace: str | None = None
    """A failure's traceback."""
    preempted_by: str | None = None
    """The task that took the instance over, when preempted."""
    fenced: bool = False
    """Preempted by a newer epoch of this same task (recovery took it over), not by another task."""

    def record(
        self,
        outcome: Outcome,
        *,
        error: str | None = None,
        trace: str | None = None,
        preempted_by: str | None = None,
        fenced: bool = False,
    ) -> None:
        """Record how the run ended; a run ends once."""
        if self.outcome is not None:
            raise AssertionError(f"the run already ended {self.outcome.value}, it cannot end {outcome.value}")
        self.outcome, self.error, self.trace = outcome, error, trace
        self.preempted_by, self.fenced = preempted_by, fenced

    def log_extra(self) -> dict[str, Any]:
        """Return what the ``operation_finished`` log line says of the end beside its outcome."""
        if self.outcome is Outcome.FAILED:
            return {"error": self.error}
        if self.outcome is Outcome.PREEMPTED:
            return {"preempted_by": self.preempted_by, "fenced": self.fenced}
        return {}
