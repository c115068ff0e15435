"""The engine's tables as SQLModel classes, for embedders to read and join in their own sessions.

An embedder whose control plane is SQLModel (FastAPI and the like) reads
instances, tasks, their steps, the audit log, hosts, claims, images and
migrations as typed models, in a plain ``sqlmodel.Session`` on the same
database, and joins its own tables to them::

    from sqlmodel import Session, select
    from lifecycle import models

    with Session(sa_engine) as session:
        query = select(models.Instance, models.Task).join(models.Task).where(models.Task.outcome == "running")
        for instance, task in session.exec(query):
            print(instance.name, task.operation, [step.name for step in task.steps])

How the classes are mapped, and why:

- Each class is declared with ``__table__`` set to the engine's own
  SQLAlchemy Core table (:mod:`lifecycle.store.tables`), and each field
  names its column. There is one schema, the one alembic migrates: a
  class cannot disagree with it (the drift test compares both with the
  migrations anyway). The engine itself keeps using Core, and nothing under
  ``lifecycle`` imports this module, so the CLI and the engine never pay for
  sqlmodel and pydantic models (a test pins it).
- The classes live in a registry of their own, whose metadata is the
  engine's (``models.metadata``), not ``SQLModel.metadata``. So an
  embedder's ``SQLModel.metadata.create_all()`` or alembic autogenerate
  never creates, alters or drops the engine's tables (only
  ``lifecycle db upgrade`` does); and names as common as ``Task``, ``Host``
  or ``Image`` do not collide with the embedder's own classes in SQLModel's
  default registry, where they would make string lookups (``Relationship()``
  by name) ambiguous.
- Joins work in one session all the same: ``join(models.Task)`` follows the
  engine's foreign keys; a join from an embedder's table gives its ``ON``
  clause or a foreign key naming the column object
  (``sa.ForeignKey(models.Instance.uuid)``; a string such as
  ``"instances.uuid"`` would be looked up in ``SQLModel.metadata``), and a
  relationship to one of these classes names the class, not a string.
- An embedder whose alembic autogenerate runs on the same database leaves
  the engine's tables out (``include_name``: ``name not in
  models.metadata.tables``), or it would propose to drop them.

The classes are read-only: every change of an instance is a compare-and-swap
with its audit row in the same transaction, which only :class:`lifecycle.Engine`
writes. Flushing a new, changed or deleted object of these classes raises
:class:`sqlalchemy.exc.InvalidRequestError` and writes nothing; the
relationships are view-only (a bulk ``update()`` or ``delete()`` statement
is plain SQL and is not checked: do not write one). Values are the stored ones: states as their
enums' values (``VmState.ACTIVE`` compares equal to ``"active"``; Nova's
integer for ``power_state``), JSON columns as text, timestamps in UTC
(SQLite hands them back naive).

This module does not use ``from __future__ import annotations``: SQLModel
reads the relationship annotations at class creation.
"""

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import Field, Relationship, SQLModel

from lifecycle.store.tables import AUDITS, CLAIMS, HOSTS, IMAGES, INSTANCES, MIGRATIONS, STEPS, TASKS, metadata

__all__ = ["AuditEntry", "Claim", "Host", "Image", "Instance", "Migration", "Task", "TaskStep", "metadata"]

_registry = registry(metadata=metadata)


class _Model(SQLModel, registry=_registry):
    """The base of the classes: their own registry, the engine's metadata."""


def _column(table: sa.Table, name: str) -> Any:
    """Return the field of the column ``name`` of ``table`` (optional, None by default, when the column is nullable)."""
    column = table.c[name]
    if column.nullable:
        return Field(default=None, sa_column=column)
    return Field(sa_column=column)


def _view(order_by: str | None = None) -> Any:
    """Return a view-only relationship (``order_by``: a ``"Class.column"`` string of this registry)."""
    kwargs: dict[str, Any] = {"viewonly": True}
    if order_by is not None:
        kwargs["order_by"] = order_by
    return Relationship(sa_relationship_kwargs=kwargs)


class Host(_Model, table=True):
    """A hypervisor host (the ``hosts`` table); ``claims`` are the resources instances hold on it."""

    __table__ = HOSTS

    name: str = _column(HOSTS, "name")
    driver_uri: str = _column(HOSTS, "driver_uri")
    instances_path: str = _column(HOSTS, "instances_path")
    enabled: bool = _column(HOSTS, "enabled")
    created_at: datetime = _column(HOSTS, "created_at")
    availability_zone: str = _column(HOSTS, "availability_zone")
    vcpus: int | None = _column(HOSTS, "vcpus")
    memory_mb: int | None = _column(HOSTS, "memory_mb")
    disk_gb: int | None = _column(HOSTS, "disk_gb")
    vcpus_used: int = _column(HOSTS, "vcpus_used")
    memory_mb_used: int = _column(HOSTS, "memory_mb_used")
    disk_gb_used: int = _column(HOSTS, "disk_gb_used")
    capabilities: str = _column(HOSTS, "capabilities")
    hypervisor_type: str = _column(HOSTS, "hypervisor_type")
    architecture: str = _column(HOSTS, "architecture")
    metrics: str = _column(HOSTS, "metrics")
    last_heartbeat: datetime | None = _column(HOSTS, "last_heartbeat")
    console_address: str | None = _column(HOSTS, "console_address")
    fenced_at: datetime | None = _column(HOSTS, "fenced_at")
    fenced_by: str | None = _column(HOSTS, "fenced_by")
    fenced_reason: str | None = _column(HOSTS, "fenced_reason")

    instances: list["Instance"] = _view("Instance.uuid")
    claims: list["Claim"] = _view("Claim.instance_uuid")


class Claim(_Model, table=True):
    """Resources one instance holds on one host (the ``claims`` table; two rows during a move)."""

    __table__ = CLAIMS

    instance_uuid: str = _column(CLAIMS, "instance_uuid")
    host: str = _column(CLAIMS, "host")
    vcpus: int = _column(CLAIMS, "vcpus")
    memory_mb: int = _column(CLAIMS, "memory_mb")
    disk_gb: int = _column(CLAIMS, "disk_gb")
    created_at: datetime = _column(CLAIMS, "created_at")


class Image(_Model, table=True):
    """An image instances boot from (the ``images`` table); ``properties`` is a JSON object."""

    __table__ = IMAGES

    name: str = _column(IMAGES, "name")
    path: str = _column(IMAGES, "path")
    disk_format: str = _column(IMAGES, "disk_format")
    min_disk_gb: int = _column(IMAGES, "min_disk_gb")
    created_at: datetime = _column(IMAGES, "created_at")
    properties: str = _column(IMAGES, "properties")


class Instance(_Model, table=True):
    """An instance (the ``instances`` table): its flavor, placement and three states, with its tasks and moves."""

    __table__ = INSTANCES

    uuid: str = _column(INSTANCES, "uuid")
    name: str = _column(INSTANCES, "name")
    host: str | None = _column(INSTANCES, "host")
    flavor_name: str = _column(INSTANCES, "flavor_name")
    vcpus: int = _column(INSTANCES, "vcpus")
    memory_mb: int = _column(INSTANCES, "memory_mb")
    root_gb: int = _column(INSTANCES, "root_gb")
    flavor_extra_specs: str = _column(INSTANCES, "flavor_extra_specs")
    image: str = _column(INSTANCES, "image")
    vm_state: str = _column(INSTANCES, "vm_state")
    task_state: str | None = _column(INSTANCES, "task_state")
    power_state: int = _column(INSTANCES, "power_state")
    task_id: str | None = _column(INSTANCES, "task_id")
    previous_vm_state: str | None = _column(INSTANCES, "previous_vm_state")
    version: int = _column(INSTANCES, "version")
    missing_count: int = _column(INSTANCES, "missing_count")
    locked_by: str | None = _column(INSTANCES, "locked_by")
    locked_reason: str | None = _column(INSTANCES, "locked_reason")
    locked_at: datetime | None = _column(INSTANCES, "locked_at")
    disk: str | None = _column(INSTANCES, "disk")
    launched_at: datetime | None = _column(INSTANCES, "launched_at")
    created_at: datetime = _column(INSTANCES, "created_at")
    updated_at: datetime = _column(INSTANCES, "updated_at")
    deleted_at: datetime | None = _column(INSTANCES, "deleted_at")
    project_id: str | None = _column(INSTANCES, "project_id")
    user_id: str | None = _column(INSTANCES, "user_id")
    instance_metadata: str = _column(INSTANCES, "instance_metadata")

    tasks: list["Task"] = _view("[Task.started_at, Task.id]")
    claims: list["Claim"] = _view("Claim.host")
    migrations: list["Migration"] = _view("[Migration.created_at, Migration.id]")


class Task(_Model, table=True):
    """One run of one operation on one instance (the ``tasks`` table), with its step log in order."""

    __table__ = TASKS

    id: str = _column(TASKS, "id")
    instance_uuid: str = _column(TASKS, "instance_uuid")
    operation: str = _column(TASKS, "operation")
    request_id: str = _column(TASKS, "request_id")
    idempotency_key: str | None = _column(TASKS, "idempotency_key")
    actor: str = _column(TASKS, "actor")
    cause: str = _column(TASKS, "cause")
    params: str = _column(TASKS, "params")
    outcome: str = _column(TASKS, "outcome")
    preempted_by: str | None = _column(TASKS, "preempted_by")
    owner: str = _column(TASKS, "owner")
    lease_expires_at: datetime = _column(TASKS, "lease_expires_at")
    started_at: datetime = _column(TASKS, "started_at")
    finished_at: datetime | None = _column(TASKS, "finished_at")
    error: str | None = _column(TASKS, "error")
    traceback: str | None = _column(TASKS, "traceback")
    epoch: int = _column(TASKS, "epoch")

    instance: "Instance" = _view()
    steps: list["TaskStep"] = _view("[TaskStep.seq, TaskStep.id]")


class TaskStep(_Model, table=True):
    """One entry of a task's step log (the ``task_steps`` table)."""

    __table__ = STEPS

    id: int = _column(STEPS, "id")
    task_id: str = _column(STEPS, "task_id")
    seq: int = _column(STEPS, "seq")
    name: str = _column(STEPS, "name")
    started_at: datetime = _column(STEPS, "started_at")
    finished_at: datetime | None = _column(STEPS, "finished_at")
    result: str | None = _column(STEPS, "result")
    detail: str | None = _column(STEPS, "detail")
    bytes_done: int | None = _column(STEPS, "bytes_done")
    bytes_total: int | None = _column(STEPS, "bytes_total")


class AuditEntry(_Model, table=True):
    """One change of an instance's states and why it happened (the ``audit_log`` table, the change feed)."""

    __table__ = AUDITS

    id: int = _column(AUDITS, "id")
    instance_uuid: str = _column(AUDITS, "instance_uuid")
    task_id: str | None = _column(AUDITS, "task_id")
    request_id: str | None = _column(AUDITS, "request_id")
    actor: str = _column(AUDITS, "actor")
    cause: str = _column(AUDITS, "cause")
    operation: str | None = _column(AUDITS, "operation")
    rule: str | None = _column(AUDITS, "rule")
    from_vm_state: str | None = _column(AUDITS, "from_vm_state")
    to_vm_state: str = _column(AUDITS, "to_vm_state")
    from_task_state: str | None = _column(AUDITS, "from_task_state")
    to_task_state: str | None = _column(AUDITS, "to_task_state")
    from_power_state: int | None = _column(AUDITS, "from_power_state")
    to_power_state: int = _column(AUDITS, "to_power_state")
    message: str | None = _column(AUDITS, "message")
    created_at: datetime = _column(AUDITS, "created_at")
    host: str | None = _column(AUDITS, "host")
    tx: int = _column(AUDITS, "tx")
    project_id: str | None = _column(AUDITS, "project_id")
    user_id: str | None = _column(AUDITS, "user_id")


class Migration(_Model, table=True):
    """One cold migration or resize (the ``migrations`` table); the flavors are JSON (``Flavor.as_dict()``)."""

    __table__ = MIGRATIONS

    id: str = _column(MIGRATIONS, "id")
    instance_uuid: str = _column(MIGRATIONS, "instance_uuid")
    task_id: str = _column(MIGRATIONS, "task_id")
    kind: str = _column(MIGRATIONS, "kind")
    source_host: str = _column(MIGRATIONS, "source_host")
    dest_host: str | None = _column(MIGRATIONS, "dest_host")
    old_flavor: str = _column(MIGRATIONS, "old_flavor")
    new_flavor: str = _column(MIGRATIONS, "new_flavor")
    status: str = _column(MIGRATIONS, "status")
    previous_vm_state: str = _column(MIGRATIONS, "previous_vm_state")
    source_disk: str | None = _column(MIGRATIONS, "source_disk")
    created_at: datetime = _column(MIGRATIONS, "created_at")
    updated_at: datetime = _column(MIGRATIONS, "updated_at")
    finished_at: datetime | None = _column(MIGRATIONS, "finished_at")


_MODELS: tuple[type[_Model], ...] = (Host, Claim, Image, Instance, Task, TaskStep, AuditEntry, Migration)


def _refuse_write(mapper: Any, connection: Any, target: _Model) -> None:
    """Refuse to flush a write: the engine's rows change only through the engine."""
    raise sa.exc.InvalidRequestError(
        f"lifecycle.models.{type(target).__name__} is read-only: change it through lifecycle.Engine, whose writes "
        "are compare-and-swaps with their audit row"
    )


for _model in _MODELS:
    for _event in ("before_insert", "before_update", "before_delete"):
        sa.event.listen(_model, _event, _refuse_write)
