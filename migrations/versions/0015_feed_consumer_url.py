"""feed consumer url

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-14 10:00:00

A webhook sender stores the URL it delivers to with its feed consumer, so
``lifecycle changes consumers`` can say where each ``webhook:`` consumer
posts (NULL for other consumers, and for senders registered earlier until
they run again). URLs never hold a secret: a user or password in one is
refused before anything is written.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("feed_consumers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("url", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True))


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table("feed_consumers", schema=None) as batch_op:
        batch_op.drop_column("url")
