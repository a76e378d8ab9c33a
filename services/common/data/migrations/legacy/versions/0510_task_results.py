"""Each task's result folder is named by its row.

An analyzer writes a finished task's files into a folder of their own,
``<spool>/<task>/results.<attempt>``, syncs them to disk, and only then moves the
task to its final state, naming that folder in ``tasks.results`` in the same
guarded update: a task never reads as finished without its files.  ``NULL`` for a
task without results, and for one finished before this revision (its folder is
the plain ``results``).

Revision ID: 0510
Revises: 0400
"""

import sqlalchemy as sa
from alembic import op

revision = "0510"
down_revision = "0400"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("results", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("results")
