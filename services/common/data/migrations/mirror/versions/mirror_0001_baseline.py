"""The mirror's tables as the single chain of earlier versions left them (0530).

A database carried over from that chain is stamped here without running it.

Revision ID: mirror_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "mirror_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
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
        sa.Column("source_nvr", sa.Text),
        sa.Column("index_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("index_conflicts", sa.Integer, nullable=False, server_default="0"),
        sa.UniqueConstraint("os_release", "name", "epoch", "version", "release", "arch"),
    )
    op.create_index("ix_packages_name", "packages", ["name", "os_release"])
    op.create_index("ix_packages_source_nvr", "packages", ["source_nvr"])
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
        sa.Column("source", sa.String(8), nullable=False, server_default="header"),
        sa.PrimaryKeyConstraint("build_id", "package_id", "path"),
    )
    op.create_index("ix_build_ids_package", "build_ids", ["package_id"])
    op.create_index("ix_build_ids_path", "build_ids", ["path"])
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
    op.drop_table("koji_builds")
    op.drop_table("build_ids")
    op.drop_table("packages")
