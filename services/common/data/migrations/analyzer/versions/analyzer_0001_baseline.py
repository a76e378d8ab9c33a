"""The analyzer's table as the single chain of earlier versions left it (0530).

A database carried over from that chain is stamped here without running it.

``task_fetches.task_id`` keeps its foreign key to the intake's ``tasks.id`` (ON
DELETE CASCADE): when the intake forgets a task, the database forgets its fetch, so
the intake never names this table and the analyzer needs no sweep of its own.  The
price is an order: the intake's branch is migrated first (``retrace-admin migrate``
does), and the intake never renames or drops ``tasks.id``.

Revision ID: analyzer_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "analyzer_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task_fetches",
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("nvr", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("woken_by", sa.String(64)),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
    )
    op.create_index("ix_task_fetches_nvr", "task_fetches", ["nvr"])


def downgrade() -> None:
    op.drop_table("task_fetches")
