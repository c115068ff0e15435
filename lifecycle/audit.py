"""Audit records: one per change of vm_state, task_state or power_state.

Each record is written in the same transaction as the change it explains, and
says who (actor), why (cause, operation, rule), under which task and request,
and the from/to of all three states. ``history`` in the engine reads them back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from lifecycle.records import Cause

__all__ = ["AuditEntry", "Why", "format_history"]


@dataclass(frozen=True, slots=True)
class Why:
    """The reason attached to a state write: who, what for, and under which task."""

    actor: str
    cause: Cause
    operation: str | None = None
    task_id: str | None = None
    request_id: str | None = None
    rule: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of an instance's audit log."""

    id: int
    instance_uuid: str
    task_id: str | None
    request_id: str | None
    actor: str
    cause: str
    operation: str | None
    rule: str | None
    from_vm_state: str | None
    to_vm_state: str
    from_task_state: str | None
    to_task_state: str | None
    from_power_state: int | None
    to_power_state: int
    message: str | None
    created_at: datetime


def _arrow(before: object, after: object) -> str:
    left = "none" if before is None else str(before)
    right = "none" if after is None else str(after)
    return right if left == right else f"{left}->{right}"


def format_history(entries: Iterable[AuditEntry]) -> str:
    """Render entries as aligned lines a person can read top to bottom."""
    lines = []
    for e in entries:
        states = (
            f"vm {_arrow(e.from_vm_state, e.to_vm_state)}"
            f"  task {_arrow(e.from_task_state, e.to_task_state)}"
            f"  power {_arrow(e.from_power_state, e.to_power_state)}"
        )
        why = " ".join(
            part
            for part in (
                f"{e.cause}:{e.actor}",
                e.operation and f"op={e.operation}",
                e.task_id and f"task={e.task_id[:8]}",
                e.rule and f"rule={e.rule}",
                e.message and f"message={e.message!r}",
            )
            if part
        )
        lines.append(f"{e.created_at.isoformat(timespec='milliseconds')}  {states}  [{why}]")
    return "\n".join(lines)
