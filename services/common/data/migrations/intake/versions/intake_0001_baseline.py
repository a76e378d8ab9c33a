"""The intake's tables as the single chain of earlier versions left them (0530).

A database carried over from that chain is stamped here without running it.

Revision ID: intake_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "intake_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("password_digest", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("task_type", sa.String(16), nullable=False),
        sa.Column("arch", sa.String(32), nullable=False),
        sa.Column("progress", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("crash_function", sa.Text),
        sa.Column("crash_module", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("previous_digest", sa.String(64)),
        sa.Column("rotated_at", sa.DateTime(timezone=True)),
        sa.Column("previous_replays", sa.Integer, nullable=False, server_default="0"),
        sa.Column("results", sa.String(64)),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_tasks_status", "tasks", ["status"])
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
        sa.Column("task_id", sa.String(64)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("renewed_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_uploads_client", "uploads", ["client"])


def downgrade() -> None:
    op.drop_table("uploads")
    op.drop_table("password_failures")
    op.drop_table("tasks")
