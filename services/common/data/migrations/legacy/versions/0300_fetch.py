"""Tasks waiting for the mirror to fetch their crashed build.

Revision ID: 0300
Revises: 0100
"""

import sqlalchemy as sa
from alembic import op

revision = "0300"
down_revision = "0100"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task_fetches",
        sa.Column(
            "task_id",
            sa.String(64),
            sa.ForeignKey("tasks.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("nvr", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("woken_by", sa.String(64)),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_task_fetches_nvr", "task_fetches", ["nvr"])


def downgrade() -> None:
    op.drop_index("ix_task_fetches_nvr", "task_fetches")
    op.drop_table("task_fetches")
