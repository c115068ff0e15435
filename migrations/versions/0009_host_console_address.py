"""host console address

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 15:05:00

A host on another machine has its guests' VNC servers listen on its own
management address; the console token resolves to that address.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('console_address', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True))


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_column('console_address')
