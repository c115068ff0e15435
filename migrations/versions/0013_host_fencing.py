"""host fencing

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-28 10:00:00

An operator fences a dead host (who, why, when): the scheduler never places
on it, and its instances may be evacuated while it is down.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fenced_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("fenced_by", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True))
        batch_op.add_column(sa.Column("fenced_reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("fenced_reason")
        batch_op.drop_column("fenced_by")
        batch_op.drop_column("fenced_at")
