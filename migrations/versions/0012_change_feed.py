"""change feed and audit queries

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28 10:00:00

Every audit row becomes a change of the feed (``lifecycle changes``):

- ``audit_log.tx`` orders the feed on PostgreSQL, where a sequence's ids are
  not commit order. A ``BEFORE INSERT`` trigger sets it to the writing
  transaction's id (``pg_current_xact_id()``), or to the instance's latest
  ``tx`` if that is greater, and sends a ``NOTIFY lifecycle_changes`` that
  wakes followers at commit. Rows written before this revision get ``tx`` 1,
  below every transaction id, so they come first, in id order. On SQLite it
  stays 0: writers commit one at a time, so the id is the order.
- ``audit_log.host``: the instance's host at the change (None on older rows:
  where an instance was at each past change is not known).
- ``feed_consumers``: each named follower's position; retention never prunes
  a change a consumer has not passed.
- Indexes for the feed and for ``lifecycle audit`` queries by time, request,
  host and cause, cause, operation, and changes into a vm_state.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FEED_FUNCTION = """
CREATE FUNCTION lifecycle_audit_feed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The writer's transaction id orders the feed; the instance's latest tx keeps one instance's
    -- changes in order even when this transaction got its id before the previous change committed.
    NEW.tx := GREATEST(
        pg_current_xact_id()::text::bigint,
        (SELECT max(tx) FROM audit_log WHERE instance_uuid = NEW.instance_uuid AND tx > 0)
    );
    PERFORM pg_notify('lifecycle_changes', '');
    RETURN NEW;
END
$$
"""
_FEED_TRIGGER = (
    "CREATE TRIGGER audit_log_feed BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION lifecycle_audit_feed()"
)


def _indexes() -> list[tuple[str, list[str], dict[str, object]]]:
    def where(sqlite: str, postgresql: str | None = None) -> dict[str, object]:
        return {'sqlite_where': sa.text(sqlite), 'postgresql_where': sa.text(postgresql or sqlite)}

    return [
        ('ix_audit_log_feed', ['tx', 'id'], where('tx > 0')),
        ('ix_audit_log_instance_tx', ['instance_uuid', 'tx'], where('tx > 0')),
        ('ix_audit_log_created_at', ['created_at', 'id'], {}),
        ('ix_audit_log_request', ['request_id', 'created_at', 'id'], where('request_id IS NOT NULL')),
        ('ix_audit_log_host_cause', ['host', 'cause', 'created_at', 'id'], where('host IS NOT NULL')),
        ('ix_audit_log_cause', ['cause', 'created_at', 'id'], {}),
        ('ix_audit_log_operation', ['operation', 'created_at', 'id'], where('operation IS NOT NULL')),
        (
            'ix_audit_log_entered',
            ['to_vm_state', 'created_at', 'id'],
            where('from_vm_state IS NOT to_vm_state', 'from_vm_state IS DISTINCT FROM to_vm_state'),
        ),
    ]


def upgrade() -> None:
    """Apply this revision."""
    op.create_table('feed_consumers',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('tx', sa.BigInteger(), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True))
        batch_op.add_column(sa.Column('tx', sa.BigInteger(), server_default=sa.text('0'), nullable=False))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("UPDATE audit_log SET tx = 1")
        op.execute(_FEED_FUNCTION)
        op.execute(_FEED_TRIGGER)
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        for name, columns, kw in _indexes():
            batch_op.create_index(name, columns, unique=False, **kw)


def downgrade() -> None:
    """Undo this revision (consumers' positions and the rows' hosts are dropped)."""
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        for name, _columns, kw in reversed(_indexes()):
            batch_op.drop_index(name, **kw)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER audit_log_feed ON audit_log")
        op.execute("DROP FUNCTION lifecycle_audit_feed()")
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_column('tx')
        batch_op.drop_column('host')
    op.drop_table('feed_consumers')
