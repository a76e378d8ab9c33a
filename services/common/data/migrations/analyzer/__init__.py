"""The analyzer's migrations: its own branch, version table ``alembic_version_analyzer``."""
