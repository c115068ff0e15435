"""instance attribution and listing indexes

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-22 10:00:00

An instance names who it is for, as the embedding control plane says
(``project_id``, ``user_id``, NULL before), and carries the caller's small
metadata map (a JSON object, '{}' before). Each audit row (each change of the
feed) records the project and user too. ``Engine.list`` pages by
(created_at, uuid), of all instances or of one project: an index each.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("project_id", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("user_id", sa.String(length=255), nullable=True))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("project_id", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("user_id", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("instance_metadata", sa.String(), server_default="{}", nullable=False))
        batch_op.create_index("ix_instances_created_at_uuid", ["created_at", "uuid"], unique=False)
        batch_op.create_index(
            "ix_instances_project_created_at_uuid", ["project_id", "created_at", "uuid"], unique=False
        )


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index("ix_instances_project_created_at_uuid")
        batch_op.drop_index("ix_instances_created_at_uuid")
        batch_op.drop_column("instance_metadata")
        batch_op.drop_column("user_id")
        batch_op.drop_column("project_id")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_column("user_id")
        batch_op.drop_column("project_id")
