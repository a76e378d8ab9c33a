"""Alembic environment of the intake's branch (version table ``alembic_version_intake``)."""

from services.common.data.schema import run_environment

run_environment()
