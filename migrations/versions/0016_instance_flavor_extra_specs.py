"""instance flavor extra specs

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-21 10:00:00

An instance keeps its flavor whole: the extra specs (``capabilities:ssd`` and
the like) are stored with the name and sizes, as a JSON object, so an
instance reads back with the flavor it was created or resized with. Rows
written before hold '{}' (their extra specs were never stored).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("flavor_extra_specs", sa.String(), server_default="{}", nullable=False))


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("flavor_extra_specs")
