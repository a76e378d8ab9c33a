"""The mirror's migrations: its own branch, version table ``alembic_version_mirror``."""
