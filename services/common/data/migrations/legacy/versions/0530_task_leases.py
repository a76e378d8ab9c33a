"""Which analyzer is working on a running task, renewed while it works.

A dead-lettered analyze command whose task an analyzer still holds a fresh lease on
was returned by connection losses, not by failures: it waits and comes back instead of
failing the task.  An analyzer that receives a command for a task another live
analyzer holds parks it the same way instead of retracing it twice.

Revision ID: 0530
Revises: 0520
"""

import sqlalchemy as sa
from alembic import op

revision = "0530"
down_revision = "0520"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(128)))
        batch.add_column(sa.Column("lease_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("lease_at")
        batch.drop_column("lease_owner")
