"""One call that starts a task, its arguments checked, and the records it makes.

:class:`lifecycle.runner.Runner` checks a call's arguments into an :class:`Ask`;
from it come the task record's fields, the reason of the task's first write
(the task it preempts, the lock it overrides) and, for an operation that
creates its instance, that instance's first record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lifecycle.audit import Why
from lifecycle.records import Cause, Flavor, Image, Instance, Task
from lifecycle.registry import Definition
from lifecycle.states import PowerState, TaskState, VmState

__all__ = ["Ask", "new_instance"]


@dataclass(frozen=True, slots=True)
class Ask:
    """One call of :meth:`Runner.start`, its arguments checked."""

    defined: Definition
    uuid: str
    params: dict[str, Any]
    request_id: str | None
    key: str | None
    actor: str
    cause: Cause
    override_lock: bool
    only_idle_in: VmState | None
    uuid_chosen: bool = True
    """Whether the caller named the instance (False: a create given a fresh uuid, which its key does not cover)."""

    def task_fields(self) -> dict[str, Any]:
        """Return the keyword arguments of :meth:`Runner.new_task` this call gives."""
        return {name: getattr(self, name) for name in ("params", "request_id", "key", "actor", "cause")}

    def why(self, task: Task, preempt: Task | None, overriding: Instance | None) -> Why:
        """Return the reason of the task's first write: the task it preempts, the lock it overrides."""
        return Why(
            actor=self.actor,
            cause=self.cause,
            operation=self.defined.name,
            task_id=task.id,
            request_id=task.request_id,
            rule=self.params.get("rule"),
            message=_start_note(preempt, overriding) or _attribution(self.params),
        )


def new_instance(ask: Ask, image: Image, first: TaskState, task: Task) -> Instance:
    """Return the record of the instance an operation creates, from its arguments: building, in its first step."""
    at = task.started_at
    return Instance(
        uuid=ask.uuid,
        name=ask.params["name"],
        host=None,
        flavor=Flavor.from_dict(ask.params["flavor"]),
        image=image.name,
        vm_state=VmState.BUILDING,
        task_state=first,
        power_state=PowerState.NOSTATE,
        task_id=task.id,
        previous_vm_state=None,
        version=1,
        launched_at=None,
        created_at=at,
        updated_at=at,
        deleted_at=None,
        project_id=ask.params.get("project_id"),
        user_id=ask.params.get("user_id"),
        metadata=dict(ask.params.get("metadata") or {}),
    )


def _attribution(params: dict[str, Any]) -> str | None:
    """Say whom a create's instance is for (its project, user and metadata), for its first audit row."""
    parts = [f"{key} {params[key]}" for key in ("project_id", "user_id") if params.get(key) is not None]
    if params.get("metadata"):
        parts.append(f"metadata {json.dumps(params['metadata'], sort_keys=True, ensure_ascii=False)}")
    return ", ".join(parts) or None


def _start_note(preempt: Task | None, overriding: Instance | None) -> str | None:
    """Say what a starting task's first audit row should: the task it preempts, the lock it overrides."""
    notes = []
    if preempt is not None:
        notes.append(f"preempts {preempt.operation} task {preempt.id}")
    if overriding is not None and overriding.locked_by is not None:
        notes.append(f"overrides the lock of {overriding.locked_by} ({overriding.locked_reason})")
    return "; ".join(notes) or None
