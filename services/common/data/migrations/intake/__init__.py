"""The intake's migrations: its own branch, version table ``alembic_version_intake``."""
