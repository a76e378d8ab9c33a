"""Alembic environment of the frozen legacy chain (version table ``alembic_version``)."""

from services.common.data.schema import run_environment

run_environment()
