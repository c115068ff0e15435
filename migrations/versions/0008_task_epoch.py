"""task epoch for fencing takeovers

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 14:00:00

Each takeover of a running task by recovery increments the task's epoch; a
worker still holding an older epoch stops before its next driver call.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('epoch', sa.Integer(), server_default=sa.text('0'), nullable=False))


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('epoch')
