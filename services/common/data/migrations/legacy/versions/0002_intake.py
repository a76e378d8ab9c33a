"""The intake's bookkeeping: rotating passwords, wrong-password counts, uploads in flight.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("previous_digest", sa.String(64)))
        batch.add_column(sa.Column("rotated_at", sa.DateTime(timezone=True)))
        batch.add_column(
            sa.Column("previous_replays", sa.Integer, nullable=False, server_default="0")
        )
    op.create_table(
        "password_failures",
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("task_id", "client"),
    )
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_uploads_client", "uploads", ["client"])


def downgrade() -> None:
    op.drop_table("uploads")
    op.drop_table("password_failures")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("previous_replays")
        batch.drop_column("rotated_at")
        batch.drop_column("previous_digest")
