"""One Alembic script directory per owner (intake, mirror, analyzer), each with its
own version table, and the frozen single chain of earlier versions (legacy)."""
