"""The database, split by owner.

One database, but each service owns its tables: :mod:`.intake` (tasks, passwords,
uploads), :mod:`.mirror` (the package and build-id index, Koji builds, cursors) and
:mod:`.analyzer` (tasks waiting for a build).  Only the owner's module names its
tables; another service reads or updates them through that module's functions.
:mod:`.db` is the plumbing they share, and :mod:`.schema` the migrations: one Alembic
branch and version table per owner.
"""
