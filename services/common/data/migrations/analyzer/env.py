"""Alembic environment of the analyzer's branch (version table ``alembic_version_analyzer``)."""

from services.common.data.schema import run_environment

run_environment()
