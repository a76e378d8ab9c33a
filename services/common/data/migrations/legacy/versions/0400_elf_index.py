"""The build-id index read from the ELF files inside each package.

Each package records the build it came from (its source RPM's NVR) and how it was
indexed (0: from the header's ``.build-id`` links only, as before; 1: from the
build-id notes of the ELF files in its payload, with the links as a second
source).  Each build-id entry records where it was read (``elf`` or ``header``).
``retrace-mirror reindex`` brings packages indexed the old way up to date.

Revision ID: 0400
Revises: 0300
"""

import sqlalchemy as sa
from alembic import op

revision = "0400"
down_revision = "0300"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("packages") as batch:
        batch.add_column(sa.Column("source_nvr", sa.Text))
        batch.add_column(sa.Column("index_version", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("index_conflicts", sa.Integer, nullable=False, server_default="0")
        )
    with op.batch_alter_table("build_ids") as batch:
        batch.add_column(sa.Column("source", sa.String(8), nullable=False, server_default="header"))
    op.create_index("ix_packages_source_nvr", "packages", ["source_nvr"])
    op.create_index("ix_build_ids_path", "build_ids", ["path"])


def downgrade() -> None:
    op.drop_index("ix_build_ids_path", "build_ids")
    op.drop_index("ix_packages_source_nvr", "packages")
    with op.batch_alter_table("build_ids") as batch:
        batch.drop_column("source")
    with op.batch_alter_table("packages") as batch:
        batch.drop_column("index_conflicts")
        batch.drop_column("index_version")
        batch.drop_column("source_nvr")
