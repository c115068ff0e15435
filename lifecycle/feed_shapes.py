"""The shapes a change is delivered in: JSON data, one line of text, Nova's versioned notification.

:mod:`lifecycle.feed` re-exports these; webhooks and the CLI's ``changes`` render through them.
"""

from __future__ import annotations

import uuid as uuidlib
from datetime import UTC
from typing import Any

from lifecycle.audit import AuditEntry, Change

__all__ = ["as_change", "change_data", "change_line", "nova_notification"]


def as_change(e: AuditEntry) -> Change:
    """Return an audit row as the change the feed delivers for it."""
    return Change(
        tx=e.tx,
        id=e.id,
        instance_uuid=e.instance_uuid,
        host=e.host,
        old_vm_state=e.from_vm_state,
        new_vm_state=e.to_vm_state,
        old_task_state=e.from_task_state,
        new_task_state=e.to_task_state,
        old_power_state=e.from_power_state,
        new_power_state=e.to_power_state,
        task_id=e.task_id,
        operation=e.operation,
        actor=e.actor,
        cause=e.cause,
        rule=e.rule,
        request_id=e.request_id,
        message=e.message,
        timestamp=e.created_at,
        project_id=e.project_id,
        user_id=e.user_id,
    )


def change_data(change: Change) -> dict[str, Any]:
    """Return the change as JSON-ready data (the position as its ``tx:id`` text): :meth:`Change.to_dict`."""
    return change.to_dict()


def _arrow(before: object, after: object) -> str:
    left, right = ("none" if v is None else str(v) for v in (before, after))
    return right if left == right else f"{left}->{right}"


def change_line(change: Change) -> str:
    """Render a change as one line: position, time, instance, host, the three states, and why."""
    why = " ".join(
        part
        for part in (
            f"{change.cause}:{change.actor}",
            change.operation and f"op={change.operation}",
            change.task_id and f"task={change.task_id[:8]}",
            change.rule and f"rule={change.rule}",
            change.request_id and f"request={change.request_id}",
            change.message and f"message={change.message!r}",
        )
        if part
    )
    return (
        f"{change.position}  {change.timestamp.isoformat(timespec='milliseconds')}  {change.instance_uuid}"
        f"  {change.host or '-'}  vm {_arrow(change.old_vm_state, change.new_vm_state)}"
        f"  task {_arrow(change.old_task_state, change.new_task_state)}"
        f"  power {_arrow(change.old_power_state, change.new_power_state)}  [{why}]"
    )


_NOVA_POWER = {0: "pending", 1: "running", 3: "paused", 4: "shutdown", 6: "crashed", 7: "suspended"}
"""Nova's InstancePowerStateField values by power_state number."""
_MESSAGES = uuidlib.UUID("5d0e4bb4-2f4e-4a9e-9f65-6f2a1c1e7a11")
"""Namespace of the notifications' message ids: one change always gets the same id, so a consumer can
drop a redelivered one."""


def _nova_object(name: str, version: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "nova_object.name": name,
        "nova_object.namespace": "nova",
        "nova_object.version": version,
        "nova_object.data": data,
    }


def nova_notification(change: Change) -> dict[str, Any]:
    """Return the change as Nova's versioned ``instance.update`` notification, for consumers that read those.

    The payload carries the fields of ``InstanceUpdatePayload`` a change knows
    (``uuid``, ``host``, ``state``, ``task_state``, ``power_state``,
    ``updated_at``, ``request_id``, ``action_initiator_user`` and
    ``state_update`` with ``old_state``, ``state``, ``old_task_state``,
    ``new_task_state``), under Nova's names and value spellings; what Nova
    does not carry (the old power_state, the position, operation, cause, rule,
    task id and message) is under ``lifecycle``, beside the payload.
    """
    at = change.timestamp.astimezone(UTC)
    state_update = {
        "old_state": change.old_vm_state,
        "state": change.new_vm_state,
        "old_task_state": change.old_task_state,
        "new_task_state": change.new_task_state,
    }
    data = {
        "uuid": change.instance_uuid,
        "host": change.host,
        "state": change.new_vm_state,
        "task_state": change.new_task_state,
        "power_state": _NOVA_POWER.get(change.new_power_state),
        "updated_at": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "request_id": change.request_id,
        "action_initiator_user": change.actor,
        "tenant_id": change.project_id,
        "user_id": change.user_id,
        "state_update": _nova_object("InstanceStateUpdatePayload", "1.0", state_update),
    }
    return {
        "event_type": "instance.update",
        "priority": "INFO",
        "publisher_id": f"lifecycle:{change.host or 'none'}",
        "timestamp": at.strftime("%Y-%m-%d %H:%M:%S.%f"),
        "message_id": str(uuidlib.uuid5(_MESSAGES, f"{change.instance_uuid}/{change.position}")),
        "payload": _nova_object("InstanceUpdatePayload", "1.8", data),
        "lifecycle": {
            "position": str(change.position),
            "old_power_state": None if change.old_power_state is None else _NOVA_POWER.get(change.old_power_state),
            "operation": change.operation,
            "cause": change.cause,
            "rule": change.rule,
            "task_id": change.task_id,
            "message": change.message,
        },
    }
