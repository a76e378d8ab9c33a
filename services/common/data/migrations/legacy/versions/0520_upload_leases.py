"""Leases on uploads in flight: the spool folder each fills and the intake worker
receiving it (host, pid, last renewal), so that a dead worker's upload is let go
within a minute while a live one's is never touched.

Revision ID: 0520
Revises: 0510
"""

import sqlalchemy as sa
from alembic import op

revision = "0520"
down_revision = "0510"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("task_id", sa.String(64)))
        batch.add_column(sa.Column("host", sa.String(255)))
        batch.add_column(sa.Column("pid", sa.Integer))
        batch.add_column(sa.Column("renewed_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("renewed_at")
        batch.drop_column("pid")
        batch.drop_column("host")
        batch.drop_column("task_id")
