"""The tables, as SQLAlchemy Core. Schema changes go through alembic migrations only.

Timestamps are stored as timezone-aware UTC. State columns hold the enums'
stored values (strings, and Nova's integer for power_state).

The tables were declared as sqlmodel classes; they are plain :class:`sa.Table`
objects now, with the same columns, types, defaults and indexes (the alembic
drift test compares them with the migrations), because building ten pydantic
models on import cost every command a tenth of a second. Embedders who want
SQLModel classes import :mod:`lifecycle.models`, mapped onto these tables.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "AUDITS",
    "CLAIMS",
    "CONSOLE_TOKENS",
    "FEED_CONSUMERS",
    "HOSTS",
    "IMAGES",
    "INSTANCES",
    "MIGRATIONS",
    "STEPS",
    "TASKS",
    "metadata",
]

metadata = sa.MetaData()

_TS = sa.DateTime(timezone=True)


def _text(length: int | None = None) -> sa.String:
    """Return the type sqlmodel's ``AutoString`` became on SQLite and PostgreSQL: VARCHAR(length)."""
    return sa.String(length)


HOSTS = sa.Table(
    "hosts",  # a hypervisor host the engine drives through one driver URI
    metadata,
    sa.Column("name", _text(255), primary_key=True),
    sa.Column("driver_uri", _text(1024), nullable=False),
    sa.Column("instances_path", _text(1024), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("availability_zone", _text(255), nullable=False, default="nova", server_default="nova"),
    # Physical vCPUs; None means resources are not tracked on this host (no capacity limit).
    sa.Column("vcpus", sa.Integer, nullable=True),
    sa.Column("memory_mb", sa.Integer, nullable=True),
    sa.Column("disk_gb", sa.Integer, nullable=True),
    sa.Column("vcpus_used", sa.Integer, nullable=False, default=0, server_default=sa.text("0")),
    sa.Column("memory_mb_used", sa.Integer, nullable=False, default=0, server_default=sa.text("0")),
    sa.Column("disk_gb_used", sa.Integer, nullable=False, default=0, server_default=sa.text("0")),
    # JSON object of capability values matched by flavor extra specs (``capabilities:key``).
    sa.Column("capabilities", _text(), nullable=False, default="{}", server_default="{}"),
    sa.Column("hypervisor_type", _text(64), nullable=False, default="qemu", server_default="qemu"),
    sa.Column("architecture", _text(32), nullable=False, default="x86_64", server_default="x86_64"),
    # JSON object of metric values for the metrics weigher.
    sa.Column("metrics", _text(), nullable=False, default="{}", server_default="{}"),
    # When a daemon owning the host last reported; a host silent for too long is down.
    sa.Column("last_heartbeat", _TS, nullable=True),
    # The host's management address: its guests' VNC servers listen there (None: the engine's vnc_listen).
    sa.Column("console_address", _text(255), nullable=True),
    # When an operator fenced the host (declared it dead: nothing is placed there, its instances may be
    # evacuated); None: not fenced. Then who fenced it, and why, as the operator said.
    sa.Column("fenced_at", _TS, nullable=True),
    sa.Column("fenced_by", _text(255), nullable=True),
    sa.Column("fenced_reason", _text(), nullable=True),
)

CLAIMS = sa.Table(
    "claims",  # resources one instance holds on one host (two hosts during a move)
    metadata,
    sa.Column("instance_uuid", _text(36), sa.ForeignKey("instances.uuid"), primary_key=True),
    sa.Column("host", _text(255), sa.ForeignKey("hosts.name"), primary_key=True),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("disk_gb", sa.Integer, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
)

IMAGES = sa.Table(
    "images",  # an image instances boot from: a local file and its declared format
    metadata,
    sa.Column("name", _text(255), primary_key=True),
    sa.Column("path", _text(1024), nullable=False),
    sa.Column("disk_format", _text(32), nullable=False),
    sa.Column("min_disk_gb", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", _TS, nullable=False),
    # JSON object: architecture, hypervisor_type, ... (matched by ImagePropertiesFilter).
    sa.Column("properties", _text(), nullable=False, default="{}", server_default="{}"),
)

INSTANCES = sa.Table(
    "instances",  # an instance: identity, placement, flavor, image and the three states
    metadata,
    sa.Column("uuid", _text(36), primary_key=True),
    sa.Column("name", _text(255), nullable=False),
    sa.Column("host", _text(255), sa.ForeignKey("hosts.name"), nullable=True),
    sa.Column("flavor_name", _text(255), nullable=False),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("root_gb", sa.Integer, nullable=False),
    # JSON object of the flavor's extra specs (``Flavor.as_dict()["extra_specs"]``); '{}' on rows written
    # before migration 0016.
    sa.Column("flavor_extra_specs", _text(), nullable=False, default="{}", server_default="{}"),
    sa.Column("image", _text(255), sa.ForeignKey("images.name"), nullable=False),
    sa.Column("vm_state", _text(32), nullable=False),
    sa.Column("task_state", _text(64), nullable=True),
    sa.Column("power_state", sa.Integer, nullable=False, default=0),
    sa.Column("task_id", _text(36), nullable=True),
    # The vm_state before a suspend or a move, to return to on resume or revert.
    sa.Column("previous_vm_state", _text(32), nullable=True),
    # Bumped by every write; part of every compare-and-swap.
    sa.Column("version", sa.Integer, nullable=False, default=1),
    # Consecutive sync observations in which the domain was missing (not a state: no audit).
    sa.Column("missing_count", sa.Integer, nullable=False, default=0, server_default=sa.text("0")),
    # Who locked the instance; a locked instance refuses every operation but reads unless overridden.
    sa.Column("locked_by", _text(255), nullable=True),
    sa.Column("locked_reason", _text(), nullable=True),
    sa.Column("locked_at", _TS, nullable=True),
    # The root volume the instance uses on its host (named after the attempt that made it); NULL: the bare
    # uuid of volumes made before volumes named their attempt, or no disk.
    sa.Column("disk", _text(255), nullable=True),
    sa.Column("launched_at", _TS, nullable=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    sa.Column("deleted_at", _TS, nullable=True),
    # Who the instance is for, as the embedding control plane names them (Nova's project and user ids);
    # NULL on rows written before migration 0017, and when the caller named none.
    sa.Column("project_id", _text(255), nullable=True),
    sa.Column("user_id", _text(255), nullable=True),
    # JSON object of the caller's metadata (Nova's server metadata: at most 128 items, keys and values of at
    # most 255 characters). Named after Nova's table: ``metadata`` is reserved on SQLModel classes.
    sa.Column("instance_metadata", _text(), nullable=False, default="{}", server_default="{}"),
    sa.Index("ix_instances_host_vm_state", "host", "vm_state"),
    sa.Index("ix_instances_host_uuid", "host", "uuid"),  # the sync pass pages a host by uuid
    # Engine.list pages by (created_at, uuid), of all instances or of one project.
    sa.Index("ix_instances_created_at_uuid", "created_at", "uuid"),
    sa.Index("ix_instances_project_created_at_uuid", "project_id", "created_at", "uuid"),
)

TASKS = sa.Table(
    "tasks",  # one run of one operation on one instance
    metadata,
    sa.Column("id", _text(36), primary_key=True),
    sa.Column("instance_uuid", _text(36), sa.ForeignKey("instances.uuid"), nullable=False, index=True),
    sa.Column("operation", _text(64), nullable=False),
    sa.Column("request_id", _text(64), nullable=False),
    sa.Column("idempotency_key", _text(255), nullable=True),
    sa.Column("actor", _text(255), nullable=False),
    sa.Column("cause", _text(32), nullable=False),
    # JSON arguments of the operation (reboot type, target host, ...).
    sa.Column("params", _text(), nullable=False, default="{}"),
    sa.Column("outcome", _text(16), nullable=False),
    sa.Column("preempted_by", _text(36), nullable=True),
    sa.Column("owner", _text(255), nullable=False),
    sa.Column("lease_expires_at", _TS, nullable=False),
    sa.Column("started_at", _TS, nullable=False),
    sa.Column("finished_at", _TS, nullable=True),
    sa.Column("error", _text(), nullable=True),
    sa.Column("traceback", _text(), nullable=True),
    # Grows at each takeover; a worker with an older epoch stops before its next driver call.
    sa.Column("epoch", sa.Integer, nullable=False, default=0, server_default=sa.text("0")),
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

STEPS = sa.Table(
    "task_steps",  # one step of a task: entered with its task_state, closed with the next write
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("task_id", _text(36), sa.ForeignKey("tasks.id"), nullable=False, index=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("name", _text(64), nullable=False),
    sa.Column("started_at", _TS, nullable=False),
    sa.Column("finished_at", _TS, nullable=True),
    sa.Column("result", _text(16), nullable=True),  # ok, failed or preempted; None while the step runs
    sa.Column("detail", _text(), nullable=True),
    # Bytes of data a step's disk copy has moved so far (None: the step copies nothing), and in all.
    sa.Column("bytes_done", sa.BigInteger, nullable=True),
    sa.Column("bytes_total", sa.BigInteger, nullable=True),
)

AUDITS = sa.Table(
    "audit_log",  # one change of vm_state, task_state or power_state, and why it happened
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("instance_uuid", _text(36), sa.ForeignKey("instances.uuid"), nullable=False, index=True),
    sa.Column("task_id", _text(36), nullable=True),
    sa.Column("request_id", _text(64), nullable=True),
    sa.Column("actor", _text(255), nullable=False),
    sa.Column("cause", _text(32), nullable=False),  # api, sync, event, recovery or timer
    sa.Column("operation", _text(64), nullable=True),
    sa.Column("rule", _text(128), nullable=True),
    sa.Column("from_vm_state", _text(32), nullable=True),
    sa.Column("to_vm_state", _text(32), nullable=False),
    sa.Column("from_task_state", _text(64), nullable=True),
    sa.Column("to_task_state", _text(64), nullable=True),
    sa.Column("from_power_state", sa.Integer, nullable=True),
    sa.Column("to_power_state", sa.Integer, nullable=False),
    sa.Column("message", _text(), nullable=True),
    sa.Column("created_at", _TS, nullable=False),
    # The instance's host at the change (the one it left, for a change taking it off a host); None on
    # rows written before migration 0012.
    sa.Column("host", _text(255), nullable=True),
    # The change's place in the feed, with ``id``: on PostgreSQL the writing transaction's id (at least
    # the instance's previous change's), set by a trigger; 0 on SQLite. See :mod:`lifecycle.store.feed`.
    sa.Column("tx", sa.BigInteger, nullable=False, default=0, server_default=sa.text("0")),
    # Whom the instance is for (its project_id and user_id at the change), so a feed consumer routes by
    # project; NULL on rows written before migration 0017.
    sa.Column("project_id", _text(255), nullable=True),
    sa.Column("user_id", _text(255), nullable=True),
    # The change feed and the audit queries read these indexes (lifecycle.store.feed says which reads
    # which); each ends in created_at, id so a time window is one index range, read in the order it is
    # returned. PostgreSQL only (tx is 0 on SQLite, which reads the feed by id): the feed's order, and the
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

CONSOLE_TOKENS = sa.Table(
    "console_tokens",  # a console access token, stored only as its SHA-256 hash, with an expiry
    metadata,
    sa.Column("token_hash", _text(64), primary_key=True),
    sa.Column("instance_uuid", _text(36), sa.ForeignKey("instances.uuid"), nullable=False, index=True),
    # The instance's host when the token was issued; the token dies if the instance moves.
    sa.Column("host", _text(255), nullable=False),
    sa.Column("console_host", _text(255), nullable=False),
    sa.Column("console_port", sa.Integer, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("expires_at", _TS, nullable=False),
    sa.Column("revoked_at", _TS, nullable=True),
)

MIGRATIONS = sa.Table(
    "migrations",  # one cold migration or resize of an instance, from prep to confirm or revert
    metadata,
    sa.Column("id", _text(36), primary_key=True),
    sa.Column("instance_uuid", _text(36), sa.ForeignKey("instances.uuid"), nullable=False, index=True),
    sa.Column("task_id", _text(36), nullable=False),
    sa.Column("kind", _text(16), nullable=False),  # migration (same flavor) or resize
    sa.Column("source_host", _text(255), nullable=False),
    sa.Column("dest_host", _text(255), nullable=True),
    # JSON: name, vcpus, memory_mb, root_gb before the move, and after.
    sa.Column("old_flavor", _text(), nullable=False),
    sa.Column("new_flavor", _text(), nullable=False),
    # pre-migrating, migrating, post-migrating, finished, confirmed, reverted, error.
    sa.Column("status", _text(32), nullable=False),
    sa.Column("previous_vm_state", _text(32), nullable=False),
    # Where the source keeps the disk until confirm (its ``<uuid>_resize`` copy).
    sa.Column("source_disk", _text(1024), nullable=True),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    # When the move became finished: the confirm window counts from here.
    sa.Column("finished_at", _TS, nullable=True),
)

FEED_CONSUMERS = sa.Table(
    # A named follower of the change feed and the position it has been delivered up to. Changes are
    # pruned only once every consumer's position has passed them.
    "feed_consumers",
    metadata,
    sa.Column("name", _text(255), primary_key=True),
    # With ``seq`` (the audit row id of that change), the position of the last change the consumer's
    # handler returned from.
    sa.Column("tx", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("created_at", _TS, nullable=False),
    sa.Column("updated_at", _TS, nullable=False),
    # A webhook sender's URL (never a secret: URLs with a user or password are refused); NULL for other
    # consumers, and for senders registered before revision 0015 until they run again.
    sa.Column("url", _text(1024), nullable=True),
)
