"""Tasks, packages and build-ids.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
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
    )
    op.create_index("ix_tasks_status", "tasks", ["status"])
    op.create_table(
        "packages",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("release", sa.Text, nullable=False),
        sa.Column("arch", sa.String(32), nullable=False),
        sa.Column("os_release", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("os_release", "name", "epoch", "version", "release", "arch"),
    )
    op.create_index("ix_packages_name", "packages", ["name", "os_release"])
    op.create_table(
        "build_ids",
        sa.Column("build_id", sa.String(128), nullable=False),
        sa.Column(
            "package_id",
            sa.Integer,
            sa.ForeignKey("packages.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("build_id", "package_id", "path"),
    )
    op.create_index("ix_build_ids_package", "build_ids", ["package_id"])


def downgrade() -> None:
    op.drop_table("build_ids")
    op.drop_table("packages")
    op.drop_table("tasks")
