"""Migrations: one Alembic branch, with its own version table, per owner of tables.

Each service checks at start that *its* branch is at the head its code was written
for (:func:`check`), and that the branches it reads are not behind; another branch
being ahead is normal during a rolling upgrade.  ``retrace-admin migrate`` upgrades
every branch in :data:`ORDER` (the analyzer's ``task_fetches`` refers to the intake's
``tasks``), or one (``--service``).

A database of earlier versions, on the single chain and its ``alembic_version``
table, is first brought to that chain's last revision (0530, :data:`LEGACY`), then
carried over: every branch is stamped at its first revision, which creates exactly
what 0530 left, and the old version table is dropped, in the same transaction.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from services.common.data.db import Database

MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaMismatch(Exception):
    """The database is not at the revision this code was written for."""


@dataclass(frozen=True)
class Branch:
    """One owner's migrations: a script directory and the table recording its revision."""

    name: str
    version_table: str
    requires: tuple[str, ...] = ()
    """Branches whose tables this one's refer to: they are migrated first."""
    extra_locations: tuple[Path, ...] = ()
    """More folders of revisions (a test's synthetic next revision)."""

    @property
    def directory(self) -> Path:
        """The branch's Alembic script directory."""
        return MIGRATIONS / self.name

    def config(self, connection: Connection | None = None) -> Config:
        """The Alembic configuration of this branch, running on ``connection``."""
        cfg = Config()
        cfg.set_main_option("script_location", str(self.directory))
        locations = [self.directory / "versions", *self.extra_locations]
        cfg.set_main_option("path_separator", "os")
        cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
        cfg.attributes["connection"] = connection
        cfg.attributes["version_table"] = self.version_table
        return cfg

    def script(self) -> ScriptDirectory:
        """The branch's revisions."""
        return ScriptDirectory.from_config(self.config())

    def head(self) -> str:
        """The newest revision this code knows."""
        head = self.script().get_current_head()
        assert head is not None
        return head

    def baseline(self) -> str:
        """The first revision: the tables as the legacy chain's head left them."""
        (base,) = self.script().get_bases()
        return base

    def knows(self, revision: str) -> bool:
        """Whether ``revision`` is one of this code's revisions of the branch."""
        return revision in {script.revision for script in self.script().walk_revisions()}

    def current(self, conn: Connection) -> str | None:
        """The revision the database is at (``None``: the branch was never migrated)."""
        context = MigrationContext.configure(conn, opts={"version_table": self.version_table})
        return context.get_current_revision()

    def upgrade(self, conn: Connection, revision: str = "head") -> None:
        """Run the branch's revisions up to ``revision`` on ``conn``."""
        command.upgrade(self.config(conn), revision)

    def stamp(self, conn: Connection, revision: str) -> None:
        """Record ``revision`` in the version table without running anything."""
        command.stamp(self.config(conn), revision)


INTAKE = Branch("intake", "alembic_version_intake")
MIRROR = Branch("mirror", "alembic_version_mirror")
ANALYZER = Branch("analyzer", "alembic_version_analyzer", requires=("intake",))
ORDER = (INTAKE, MIRROR, ANALYZER)
"""Every branch, in the order ``retrace-admin migrate`` runs them."""
BRANCHES = {branch.name: branch for branch in ORDER}
LEGACY = Branch("legacy", "alembic_version")
"""The frozen single chain of earlier versions (head 0530), used only to carry over."""


def run_environment() -> None:
    """The body of every branch's ``env.py``: run on the connection handed over."""
    from alembic import context  # noqa: PLC0415 - exists only while Alembic runs env.py

    attributes = context.config.attributes
    context.configure(
        connection=attributes["connection"],
        version_table=attributes["version_table"],
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


@dataclass(frozen=True)
class Migrated:
    """What ``migrate`` did to one branch."""

    branch: str
    before: str | None
    after: str | None


def legacy_revision(conn: Connection) -> str | None:
    """The legacy chain's revision, if the database still has its version table."""
    if not sa.inspect(conn).has_table(LEGACY.version_table):
        return None
    return LEGACY.current(conn) or "none"


def migrate(db: Database, branches: Sequence[Branch] = ORDER) -> tuple[str | None, list[Migrated]]:
    """Carry a legacy database over if needed, then upgrade ``branches`` to their heads.

    Return the legacy revision carried over (``None``: there was none) and, per
    branch, its revision before and after.  One transaction on PostgreSQL; SQLite
    commits some schema changes by itself.
    """
    done = []
    with db.engine.begin() as conn:
        carried = _carry_over(conn)
        for branch in sorted(branches, key=lambda b: list(BRANCHES).index(b.name)):
            for name in branch.requires:
                if BRANCHES[name].current(conn) is None:
                    raise SchemaMismatch(
                        f"the {branch.name}'s tables refer to the {name}'s, which do not "
                        f"exist yet: run 'retrace-admin migrate --service {name}' first"
                    )
            before = branch.current(conn)
            branch.upgrade(conn)
            done.append(Migrated(branch.name, before, branch.current(conn)))
    return carried, done


def _carry_over(conn: Connection) -> str | None:
    old = legacy_revision(conn)
    if old is None:
        return None
    taken = [b.name for b in ORDER if b.current(conn) is not None]
    if taken:
        raise SchemaMismatch(
            f"the database has both the legacy version table (at {old}) and the branches "
            f"{', '.join(taken)}: repair it by hand before migrating"
        )
    if old != "none" and not LEGACY.knows(old):
        raise SchemaMismatch(
            f"the database is at legacy revision {old}, unknown to this version of "
            "Retrace Server: it was migrated by a newer one"
        )
    LEGACY.upgrade(conn)
    for branch in ORDER:
        branch.stamp(conn, branch.baseline())
    conn.execute(sa.text(f"DROP TABLE {LEGACY.version_table}"))
    return old


def check(db: Database, owner: Branch, uses: Iterable[Branch] = ()) -> None:
    """Raise :class:`SchemaMismatch`, saying what to do, unless ``owner``'s branch is at
    its head and none of the other branches this service ``uses`` is behind.

    A used branch ahead of what this code knows (a revision it has never seen) is
    fine: that owner was upgraded first, the rolling upgrade.
    """
    with db.engine.connect() as conn:
        old = legacy_revision(conn)
        if old is not None:
            raise SchemaMismatch(
                f"the database is still on the single migration chain of earlier versions "
                f"(at {old}): run 'retrace-admin migrate' to carry it over to one branch "
                "per service"
            )
        current, head = owner.current(conn), owner.head()
        if current != head:
            raise SchemaMismatch(
                f"the {owner.name}'s tables are at revision {current or 'none (empty)'} "
                f"of its branch but this version of the {owner.name} needs {head}: "
                f"run 'retrace-admin migrate --service {owner.name}'"
            )
        for branch in uses:
            current = branch.current(conn)
            if current is None or (current != branch.head() and branch.knows(current)):
                raise SchemaMismatch(
                    f"the {owner.name} uses the {branch.name}'s tables, which are at "
                    f"revision {current or 'none (empty)'} of their branch but this "
                    f"version needs at least {branch.head()}: "
                    f"run 'retrace-admin migrate --service {branch.name}'"
                )
