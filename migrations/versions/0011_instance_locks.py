"""instance locks

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27 17:40:00

An operator or owner locks an instance so that no operation but a read runs
on it without an admin override: who locked it, why and when.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('locked_by', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True))
        batch_op.add_column(sa.Column('locked_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('locked_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('locked_at')
        batch_op.drop_column('locked_reason')
        batch_op.drop_column('locked_by')
