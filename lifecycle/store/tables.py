"""The sqlmodel tables. Schema changes go through alembic migrations only.

Timestamps are stored as timezone-aware UTC. State columns hold the enums'
stored values (strings, and Nova's integer for power_state).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

__all__ = [
    "AuditRow",
    "ClaimRow",
    "ConsoleTokenRow",
    "FeedConsumerRow",
    "HostRow",
    "ImageRow",
    "InstanceRow",
    "MigrationRow",
    "TaskRow",
    "TaskStepRow",
    "metadata",
]

metadata = SQLModel.metadata

_TS = sa.DateTime(timezone=True)


class HostRow(SQLModel, table=True):
    """A hypervisor host the engine drives through one driver URI."""

    __tablename__ = "hosts"

    name: str = Field(primary_key=True, max_length=255)
    driver_uri: str = Field(max_length=1024)
    instances_path: str = Field(max_length=1024)
    enabled: bool = Field(default=True)
    created_at: datetime = Field(sa_type=_TS)
    availability_zone: str = Field(default="nova", max_length=255, sa_column_kwargs={"server_default": "nova"})
    vcpus: int | None = Field(default=None)
    """Physical vCPUs; None means resources are not tracked on this host (no capacity limit)."""
    memory_mb: int | None = Field(default=None)
    disk_gb: int | None = Field(default=None)
    vcpus_used: int = Field(default=0, sa_column_kwargs={"server_default": sa.text("0")})
    memory_mb_used: int = Field(default=0, sa_column_kwargs={"server_default": sa.text("0")})
    disk_gb_used: int = Field(default=0, sa_column_kwargs={"server_default": sa.text("0")})
    capabilities: str = Field(default="{}", sa_column_kwargs={"server_default": "{}"})
    """JSON object of capability values matched by flavor extra specs (``capabilities:key``)."""
    hypervisor_type: str = Field(default="qemu", max_length=64, sa_column_kwargs={"server_default": "qemu"})
    architecture: str = Field(default="x86_64", max_length=32, sa_column_kwargs={"server_default": "x86_64"})
    metrics: str = Field(default="{}", sa_column_kwargs={"server_default": "{}"})
    """JSON object of metric values for the metrics weigher."""
    last_heartbeat: datetime | None = Field(default=None, sa_type=_TS)
    """When a daemon owning the host last reported; a host silent for too long is down."""
    console_address: str | None = Field(default=None, max_length=255)
    """The host's management address: its guests' VNC servers listen there (None: the engine's vnc_listen)."""
    fenced_at: datetime | None = Field(default=None, sa_type=_TS)
    """When an operator fenced the host (declared it dead: nothing is placed there, its instances may be
    evacuated); None: not fenced."""
    fenced_by: str | None = Field(default=None, max_length=255)
    """Who fenced the host."""
    fenced_reason: str | None = Field(default=None)
    """Why the host was fenced, as the operator said."""


class ClaimRow(SQLModel, table=True):
    """Resources one instance holds on one host (two hosts during a move)."""

    __tablename__ = "claims"

    instance_uuid: str = Field(primary_key=True, max_length=36, foreign_key="instances.uuid")
    host: str = Field(primary_key=True, max_length=255, foreign_key="hosts.name")
    vcpus: int
    memory_mb: int
    disk_gb: int
    created_at: datetime = Field(sa_type=_TS)


class ImageRow(SQLModel, table=True):
    """An image instances boot from: a local file and its declared format."""

    __tablename__ = "images"

    name: str = Field(primary_key=True, max_length=255)
    path: str = Field(max_length=1024)
    disk_format: str = Field(max_length=32)
    min_disk_gb: int = Field(default=0)
    created_at: datetime = Field(sa_type=_TS)
    properties: str = Field(default="{}", sa_column_kwargs={"server_default": "{}"})
    """JSON object: architecture, hypervisor_type, ... (matched by ImagePropertiesFilter)."""


class InstanceRow(SQLModel, table=True):
    """An instance: identity, placement, flavor, image and the three states."""

    __tablename__ = "instances"
    __table_args__ = (
        sa.Index("ix_instances_host_vm_state", "host", "vm_state"),
        sa.Index("ix_instances_host_uuid", "host", "uuid"),  # the sync pass pages a host by uuid
    )

    uuid: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=255)
    host: str | None = Field(default=None, max_length=255, foreign_key="hosts.name")
    flavor_name: str = Field(max_length=255)
    vcpus: int
    memory_mb: int
    root_gb: int
    image: str = Field(max_length=255, foreign_key="images.name")
    vm_state: str = Field(max_length=32)
    task_state: str | None = Field(default=None, max_length=64)
    power_state: int = Field(default=0)
    task_id: str | None = Field(default=None, max_length=36)
    previous_vm_state: str | None = Field(default=None, max_length=32)
    """The vm_state before a suspend or a move, to return to on resume or revert."""
    version: int = Field(default=1)
    """Bumped by every write; part of every compare-and-swap."""
    missing_count: int = Field(default=0, sa_column_kwargs={"server_default": sa.text("0")})
    """Consecutive sync observations in which the domain was missing (not a state: no audit)."""
    locked_by: str | None = Field(default=None, max_length=255)
    """Who locked the instance; a locked instance refuses every operation but reads unless overridden."""
    locked_reason: str | None = Field(default=None)
    locked_at: datetime | None = Field(default=None, sa_type=_TS)
    launched_at: datetime | None = Field(default=None, sa_type=_TS)
    created_at: datetime = Field(sa_type=_TS)
    updated_at: datetime = Field(sa_type=_TS)
    deleted_at: datetime | None = Field(default=None, sa_type=_TS)


class TaskRow(SQLModel, table=True):
    """One run of one operation on one instance."""

    __tablename__ = "tasks"
    __table_args__ = (
        # A key names one call, whatever instance it was for: reusing it elsewhere is refused.
        sa.Index(
            "uq_tasks_idempotency_key",
            "idempotency_key",
            unique=True,
            sqlite_where=sa.text("idempotency_key IS NOT NULL"),
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        ),
        sa.Index(
            "uq_tasks_one_running",
            "instance_uuid",
            unique=True,
            sqlite_where=sa.text("outcome = 'running'"),
            postgresql_where=sa.text("outcome = 'running'"),
        ),
        sa.Index("ix_tasks_outcome_lease", "outcome", "lease_expires_at"),
    )

    id: str = Field(primary_key=True, max_length=36)
    instance_uuid: str = Field(max_length=36, foreign_key="instances.uuid", index=True)
    operation: str = Field(max_length=64)
    request_id: str = Field(max_length=64)
    idempotency_key: str | None = Field(default=None, max_length=255)
    actor: str = Field(max_length=255)
    cause: str = Field(max_length=32)
    params: str = Field(default="{}")
    """JSON arguments of the operation (reboot type, target host, ...)."""
    outcome: str = Field(max_length=16)
    preempted_by: str | None = Field(default=None, max_length=36)
    owner: str = Field(max_length=255)
    lease_expires_at: datetime = Field(sa_type=_TS)
    started_at: datetime = Field(sa_type=_TS)
    finished_at: datetime | None = Field(default=None, sa_type=_TS)
    error: str | None = Field(default=None)
    traceback: str | None = Field(default=None)
    epoch: int = Field(default=0, sa_column_kwargs={"server_default": sa.text("0")})
    """Grows at each takeover; a worker with an older epoch stops before its next driver call."""


class TaskStepRow(SQLModel, table=True):
    """One step of a task: entered with its task_state, closed with the next write."""

    __tablename__ = "task_steps"

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(max_length=36, foreign_key="tasks.id", index=True)
    seq: int
    name: str = Field(max_length=64)
    started_at: datetime = Field(sa_type=_TS)
    finished_at: datetime | None = Field(default=None, sa_type=_TS)
    result: str | None = Field(default=None, max_length=16)
    """ok, failed or preempted; None while the step runs."""
    detail: str | None = Field(default=None)
    bytes_done: int | None = Field(default=None, sa_type=sa.BigInteger)
    """Bytes of data a step's disk copy has moved so far (None: the step copies nothing)."""
    bytes_total: int | None = Field(default=None, sa_type=sa.BigInteger)
    """Bytes of data the copy moves in all."""


class AuditRow(SQLModel, table=True):
    """One change of vm_state, task_state or power_state, and why it happened."""

    __tablename__ = "audit_log"
    # The change feed and the audit queries read these (lifecycle.store.feed says which reads which); each
    # ends in created_at, id so a time window is one index range, read in the order it is returned.
    __table_args__ = (
        # PostgreSQL only (tx is 0 on SQLite, which reads the feed by id): the feed's order, and the
        # instance's latest tx the insert trigger reads.
        sa.Index("ix_audit_log_feed", "tx", "id", sqlite_where=sa.text("tx > 0"), postgresql_where=sa.text("tx > 0")),
        sa.Index(
            "ix_audit_log_instance_tx",
            "instance_uuid",
            "tx",
            sqlite_where=sa.text("tx > 0"),
            postgresql_where=sa.text("tx > 0"),
        ),
        sa.Index("ix_audit_log_created_at", "created_at", "id"),
        sa.Index(
            "ix_audit_log_request",
            "request_id",
            "created_at",
            "id",
            sqlite_where=sa.text("request_id IS NOT NULL"),
            postgresql_where=sa.text("request_id IS NOT NULL"),
        ),
        sa.Index(
            "ix_audit_log_host_cause",
            "host",
            "cause",
            "created_at",
            "id",
            sqlite_where=sa.text("host IS NOT NULL"),
            postgresql_where=sa.text("host IS NOT NULL"),
        ),
        sa.Index("ix_audit_log_cause", "cause", "created_at", "id"),
        sa.Index(
            "ix_audit_log_operation",
            "operation",
            "created_at",
            "id",
            sqlite_where=sa.text("operation IS NOT NULL"),
            postgresql_where=sa.text("operation IS NOT NULL"),
        ),
        # Changes into a vm_state ("which instances went to error"): the rows that changed it.
        sa.Index(
            "ix_audit_log_entered",
            "to_vm_state",
            "created_at",
            "id",
            sqlite_where=sa.text("from_vm_state IS NOT to_vm_state"),
            postgresql_where=sa.text("from_vm_state IS DISTINCT FROM to_vm_state"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    instance_uuid: str = Field(max_length=36, foreign_key="instances.uuid", index=True)
    task_id: str | None = Field(default=None, max_length=36)
    request_id: str | None = Field(default=None, max_length=64)
    actor: str = Field(max_length=255)
    cause: str = Field(max_length=32)
    """api, sync, event, recovery or timer."""
    operation: str | None = Field(default=None, max_length=64)
    rule: str | None = Field(default=None, max_length=128)
    from_vm_state: str | None = Field(default=None, max_length=32)
    to_vm_state: str = Field(max_length=32)
    from_task_state: str | None = Field(default=None, max_length=64)
    to_task_state: str | None = Field(default=None, max_length=64)
    from_power_state: int | None = Field(default=None)
    to_power_state: int
    message: str | None = Field(default=None)
    created_at: datetime = Field(sa_type=_TS)
    host: str | None = Field(default=None, max_length=255)
    """The instance's host at the change (the one it left, for a change taking it off a host); None on
    rows written before migration 0012."""
    tx: int = Field(default=0, sa_type=sa.BigInteger, sa_column_kwargs={"server_default": sa.text("0")})
    """The change's place in the feed, with ``id``: on PostgreSQL the writing transaction's id (at least
    the instance's previous change's), set by a trigger; 0 on SQLite. See :mod:`lifecycle.store.feed`."""


class ConsoleTokenRow(SQLModel, table=True):
    """A console access token, stored only as its SHA-256 hash, with an expiry."""

    __tablename__ = "console_tokens"

    token_hash: str = Field(primary_key=True, max_length=64)
    instance_uuid: str = Field(max_length=36, foreign_key="instances.uuid", index=True)
    host: str = Field(max_length=255)
    """The instance's host when the token was issued; the token dies if the instance moves."""
    console_host: str = Field(max_length=255)
    console_port: int
    created_at: datetime = Field(sa_type=_TS)
    expires_at: datetime = Field(sa_type=_TS)
    revoked_at: datetime | None = Field(default=None, sa_type=_TS)


class MigrationRow(SQLModel, table=True):
    """One cold migration or resize of an instance, from prep to confirm or revert."""

    __tablename__ = "migrations"

    id: str = Field(primary_key=True, max_length=36)
    instance_uuid: str = Field(max_length=36, foreign_key="instances.uuid", index=True)
    task_id: str = Field(max_length=36)
    kind: str = Field(max_length=16)
    """migration (same flavor) or resize."""
    source_host: str = Field(max_length=255)
    dest_host: str | None = Field(default=None, max_length=255)
    old_flavor: str
    """JSON: name, vcpus, memory_mb, root_gb before the move."""
    new_flavor: str
    status: str = Field(max_length=32)
    """pre-migrating, migrating, post-migrating, finished, confirmed, reverted, error."""
    previous_vm_state: str = Field(max_length=32)
    source_disk: str | None = Field(default=None, max_length=1024)
    """Where the source keeps the disk until confirm (its ``<uuid>_resize`` copy)."""
    created_at: datetime = Field(sa_type=_TS)
    updated_at: datetime = Field(sa_type=_TS)
    finished_at: datetime | None = Field(default=None, sa_type=_TS)
    """When the move became finished: the confirm window counts from here."""


class FeedConsumerRow(SQLModel, table=True):
    """A named follower of the change feed and the position it has been delivered up to.

    Changes are pruned only once every consumer's position has passed them.
    """

    __tablename__ = "feed_consumers"

    name: str = Field(primary_key=True, max_length=255)
    tx: int = Field(sa_type=sa.BigInteger)
    """With ``seq``, the position of the last change the consumer's handler returned from."""
    seq: int = Field(sa_type=sa.BigInteger)
    """The audit row id of that change."""
    created_at: datetime = Field(sa_type=_TS)
    updated_at: datetime = Field(sa_type=_TS)
