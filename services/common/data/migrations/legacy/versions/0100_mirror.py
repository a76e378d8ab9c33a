"""The Koji-driven mirror: builds, which packages each brought, and a 'last seen' cursor.

Revision ID: 0100
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0100"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "koji_builds",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("nvr", sa.Text, nullable=False),
        sa.Column("os_release", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_koji_builds_nvr", "koji_builds", ["nvr"])
    op.create_table(
        "koji_build_packages",
        sa.Column(
            "build_id",
            sa.Integer,
            sa.ForeignKey("koji_builds.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "package_id",
            sa.Integer,
            sa.ForeignKey("packages.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("build_id", "package_id"),
    )
    op.create_table(
        "mirror_cursors",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mirror_cursors")
    op.drop_table("koji_build_packages")
    op.drop_index("ix_koji_builds_nvr", "koji_builds")
    op.drop_table("koji_builds")
