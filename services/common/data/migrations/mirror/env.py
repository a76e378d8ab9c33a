"""Alembic environment of the mirror's branch (version table ``alembic_version_mirror``)."""

from services.common.data.schema import run_environment

run_environment()
