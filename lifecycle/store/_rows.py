"""Row <-> record mapping: the table handles, and the values written for and read from each row."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from lifecycle.records import Cause, Flavor, Host, Image, Instance, Migration, Outcome, Task
from lifecycle.states import MigrationStatus, PowerState, TaskState, VmState
from lifecycle.store.db import aware
from lifecycle.store.tables import AUDITS, CLAIMS, CONSOLE_TOKENS, HOSTS, IMAGES, INSTANCES, MIGRATIONS, STEPS, TASKS

__all__ = [
    "AUDITS",
    "CLAIMS",
    "CONSOLE_TOKENS",
    "FLAVOR_COLUMNS",
    "HOSTS",
    "IMAGES",
    "INSTANCES",
    "MIGRATIONS",
    "STEPS",
    "TASKS",
    "flavor_values",
    "host_from",
    "hosts_from",
    "image_from",
    "instance_from",
    "instance_values",
    "migration_from",
    "migration_values",
    "stamp",
    "state_value",
    "task_from",
    "task_values",
]


def state_value(state: TaskState | VmState | None) -> str | None:
    """Return the stored value of a nullable state."""
    return None if state is None else state.value


def stamp(value: datetime) -> datetime:
    """Return a NOT NULL timestamp column as an aware datetime."""
    result = aware(value)
    assert result is not None
    return result


FLAVOR_COLUMNS = ("flavor_name", "vcpus", "memory_mb", "root_gb", "flavor_extra_specs")
"""The instance columns that hold its flavor (a resize rewrites them together)."""


def flavor_values(f: Flavor) -> dict[str, Any]:
    """Return the instance columns holding a flavor: :meth:`Flavor.as_dict`, the extra specs as a JSON object."""
    data = f.as_dict()
    return {
        "flavor_name": data["name"],
        "vcpus": data["vcpus"],
        "memory_mb": data["memory_mb"],
        "root_gb": data["root_gb"],
        "flavor_extra_specs": json.dumps(data["extra_specs"]),
    }


def _flavor_from(r: sa.RowMapping) -> Flavor:
    """Return the flavor an instance row holds, through :meth:`Flavor.from_dict`."""
    specs = r["flavor_extra_specs"]
    data = {"name": r["flavor_name"], "vcpus": r["vcpus"], "memory_mb": r["memory_mb"], "root_gb": r["root_gb"]}
    return Flavor.from_dict({**data, "extra_specs": {} if specs == "{}" else json.loads(specs)})


def instance_values(i: Instance) -> dict[str, Any]:
    """Return the column values of an instance row."""
    return {
        "uuid": i.uuid,
        "name": i.name,
        "host": i.host,
        **flavor_values(i.flavor),
        "image": i.image,
        "vm_state": i.vm_state.value,
        "task_state": state_value(i.task_state),
        "power_state": int(i.power_state),
        "task_id": i.task_id,
        "previous_vm_state": state_value(i.previous_vm_state),
        "version": i.version,
        "launched_at": i.launched_at,
        "created_at": i.created_at,
        "updated_at": i.updated_at,
        "deleted_at": i.deleted_at,
        "missing_count": i.missing_count,
        "locked_by": i.locked_by,
        "locked_reason": i.locked_reason,
        "locked_at": i.locked_at,
        "disk": i.disk,
        "project_id": i.project_id,
        "user_id": i.user_id,
        "instance_metadata": json.dumps(i.metadata),
    }


def task_values(t: Task) -> dict[str, Any]:
    """Return the column values of a task row."""
    return {
        "id": t.id,
        "instance_uuid": t.instance_uuid,
        "operation": t.operation,
        "request_id": t.request_id,
        "idempotency_key": t.idempotency_key,
        "actor": t.actor,
        "cause": t.cause.value,
        "params": json.dumps(t.params, sort_keys=True),
        "outcome": t.outcome.value,
        "preempted_by": t.preempted_by,
        "owner": t.owner,
        "lease_expires_at": t.lease_expires_at,
        "started_at": t.started_at,
        "finished_at": t.finished_at,
        "error": t.error,
        "traceback": t.traceback,
        "epoch": t.epoch,
    }


def instance_from(r: sa.RowMapping) -> Instance:
    """Return the instance an instance row holds."""
    task_state = r["task_state"]
    previous = r["previous_vm_state"]
    return Instance(
        uuid=r["uuid"],
        name=r["name"],
        host=r["host"],
        flavor=_flavor_from(r),
        image=r["image"],
        vm_state=VmState(r["vm_state"]),
        task_state=None if task_state is None else TaskState(task_state),
        power_state=PowerState(r["power_state"]),
        task_id=r["task_id"],
        previous_vm_state=None if previous is None else VmState(previous),
        version=r["version"],
        launched_at=aware(r["launched_at"]),
        created_at=stamp(r["created_at"]),
        updated_at=stamp(r["updated_at"]),
        deleted_at=aware(r["deleted_at"]),
        missing_count=r["missing_count"],
        locked_by=r["locked_by"],
        locked_reason=r["locked_reason"],
        locked_at=aware(r["locked_at"]),
        disk=r["disk"],
        project_id=r["project_id"],
        user_id=r["user_id"],
        metadata=json.loads(r["instance_metadata"]),
    )


def _flavor_json(f: Flavor) -> str:
    return json.dumps(f.as_dict())


def migration_values(m: Migration) -> dict[str, Any]:
    """Return the column values of a migration row."""
    return {
        "id": m.id,
        "instance_uuid": m.instance_uuid,
        "task_id": m.task_id,
        "kind": m.kind,
        "source_host": m.source_host,
        "dest_host": m.dest_host,
        "old_flavor": _flavor_json(m.old_flavor),
        "new_flavor": _flavor_json(m.new_flavor),
        "status": m.status.value,
        "previous_vm_state": m.previous_vm_state.value,
        "source_disk": m.source_disk,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "finished_at": m.finished_at,
    }


def migration_from(r: sa.RowMapping) -> Migration:
    """Return the migration a migration row holds."""
    return Migration(
        id=r["id"],
        instance_uuid=r["instance_uuid"],
        task_id=r["task_id"],
        kind=r["kind"],
        source_host=r["source_host"],
        dest_host=r["dest_host"],
        old_flavor=Flavor.from_dict(json.loads(r["old_flavor"])),
        new_flavor=Flavor.from_dict(json.loads(r["new_flavor"])),
        status=MigrationStatus(r["status"]),
        previous_vm_state=VmState(r["previous_vm_state"]),
        source_disk=r["source_disk"],
        created_at=stamp(r["created_at"]),
        updated_at=stamp(r["updated_at"]),
        finished_at=aware(r["finished_at"]),
        bytes_done=r.get("bytes_done"),
        bytes_total=r.get("bytes_total"),
    )


def host_from(r: sa.RowMapping) -> Host:
    """Return the host a host row holds."""
    return _host(dict(r))


def hosts_from(result: sa.Result[Any]) -> list[Host]:
    """Return the hosts of a query's rows (plain tuples zipped with the column names: a scheduler reads many)."""
    keys = list(result.keys())
    return [_host(dict(zip(keys, row, strict=True))) for row in result]


def _host(values: dict[str, Any]) -> Host:
    values["created_at"] = stamp(values["created_at"])
    values["last_heartbeat"] = aware(values["last_heartbeat"])
    values["fenced_at"] = aware(values["fenced_at"])
    values["capabilities"] = _json_object(values["capabilities"])
    values["metrics"] = _json_object(values["metrics"])
    return Host(**values)


def _json_object(text: str) -> Any:
    return {} if text == "{}" else json.loads(text)  # most hosts have no capabilities or metrics


def image_from(r: sa.RowMapping) -> Image:
    """Return the image an image row holds."""
    return Image(**{**r, "created_at": stamp(r["created_at"]), "properties": json.loads(r["properties"])})


def task_from(r: sa.RowMapping) -> Task:
    """Return the task a task row holds."""
    return Task(
        id=r["id"],
        instance_uuid=r["instance_uuid"],
        operation=r["operation"],
        request_id=r["request_id"],
        idempotency_key=r["idempotency_key"],
        actor=r["actor"],
        cause=Cause(r["cause"]),
        params=json.loads(r["params"]),
        outcome=Outcome(r["outcome"]),
        preempted_by=r["preempted_by"],
        owner=r["owner"],
        lease_expires_at=stamp(r["lease_expires_at"]),
        started_at=stamp(r["started_at"]),
        finished_at=aware(r["finished_at"]),
        error=r["error"],
        traceback=r["traceback"],
        epoch=r["epoch"],
    )
