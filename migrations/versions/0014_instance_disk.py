"""instance disk

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 14:30:00

Ownership reaches the hypervisor: a root volume is named after the attempt
that made it, and the instance records which one it uses on its host (NULL:
the bare uuid of volumes made before).
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("disk", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True))


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("disk")
