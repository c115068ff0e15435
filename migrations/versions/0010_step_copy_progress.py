"""step copy progress

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 17:30:00

A move copies its disk between hosts in its resize_finish step; the step
records the bytes moved so far and in all, so that ``tasks`` and
``migration show`` can say how far a copy got.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('task_steps', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bytes_done', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('bytes_total', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table('task_steps', schema=None) as batch_op:
        batch_op.drop_column('bytes_total')
        batch_op.drop_column('bytes_done')
