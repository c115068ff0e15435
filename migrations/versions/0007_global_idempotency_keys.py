"""idempotency keys unique across instances

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 14:20:00

A key now names one call whatever its instance, so that a key reused for
another instance is refused instead of starting a second task. Keys that
earlier schemas let two instances share keep the newest task's key as is;
the older tasks' keys get their instance uuid appended (``key@uuid``), so
nothing is dropped and the history still shows them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WHERE = sa.text("idempotency_key IS NOT NULL")


def upgrade() -> None:
    """Apply this revision."""
    tasks = sa.table(
        "tasks",
        sa.column("id", sa.String),
        sa.column("instance_uuid", sa.String),
        sa.column("idempotency_key", sa.String),
        sa.column("started_at", sa.DateTime),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(tasks.c.id, tasks.c.instance_uuid, tasks.c.idempotency_key)
        .where(tasks.c.idempotency_key.is_not(None))
        .order_by(tasks.c.idempotency_key, tasks.c.started_at.desc(), tasks.c.id)
    ).all()
    seen: set[str] = set()
    for task_id, instance_uuid, key in rows:
        if key in seen:
            conn.execute(
                sa.update(tasks).where(tasks.c.id == task_id).values(idempotency_key=f"{key}@{instance_uuid}"[:255])
            )
        seen.add(key)
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('uq_tasks_idempotency', sqlite_where=_WHERE, postgresql_where=_WHERE)
        batch_op.create_index(
            'uq_tasks_idempotency_key', ['idempotency_key'], unique=True, sqlite_where=_WHERE, postgresql_where=_WHERE
        )


def downgrade() -> None:
    """Undo this revision (per-instance keys are a weaker rule: every row still fits it)."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('uq_tasks_idempotency_key', sqlite_where=_WHERE, postgresql_where=_WHERE)
        batch_op.create_index(
            'uq_tasks_idempotency',
            ['instance_uuid', 'idempotency_key'],
            unique=True,
            sqlite_where=_WHERE,
            postgresql_where=_WHERE,
        )
