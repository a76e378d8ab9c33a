"""The per-service migration branches on a real database (SQLite, then PostgreSQL).

A database of earlier versions, on the single chain, is carried over without losing a
row; each branch's first revision creates exactly what that chain's head left; and a
rolling upgrade works both ways: one service's branch a revision ahead of what the
other services' code knows does not stop them, and that service's new code runs with
the other branches ahead of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from services.common.data import schema
from services.common.data.db import Database
from services.common.data.intake import TaskStatus
from services.common.data.mirror import (
    BuildIdKind,
    IndexEntry,
    IndexSource,
    Nevra,
    SyncState,
)
from services.common.data.schema import SchemaMismatch
from tests.data import Data
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
BUILD_ID = "ab" * 20

# One row in every table, in the columns the old chain had since its revision 0300.
OLD_ROWS: dict[str, list[dict[str, Any]]] = {
    "tasks": [
        {
            "id": "task-carried",
            "password_digest": "d" * 64,
            "status": "running",
            "task_type": "retrace",
            "arch": "x86_64",
            "progress": "Retracing",
            "created_at": NOW,
        }
    ],
    "password_failures": [
        {"task_id": "task-carried", "client": "192.0.2.1", "window_start": NOW, "failures": 2}
    ],
    "uploads": [{"id": "upload-1", "client": "192.0.2.1", "started_at": NOW}],
    "packages": [
        {
            "id": 7,
            "name": "crasher",
            "epoch": 0,
            "version": "1.0",
            "release": "1.fc40",
            "arch": "x86_64",
            "os_release": "fedora-40",
            "path": "fedora-40/x86_64/Packages/crasher-1.0-1.fc40.x86_64.rpm",
            "sha256": "0" * 64,
            "size": 1234,
            "added_at": NOW,
        }
    ],
    "build_ids": [
        {"build_id": BUILD_ID, "package_id": 7, "kind": "binary", "path": "/usr/bin/crasher"}
    ],
    "koji_builds": [{"id": 42, "nvr": "crasher-1.0-1.fc40", "state": "mirrored", "synced_at": NOW}],
    "koji_build_packages": [{"build_id": 42, "package_id": 7}],
    "mirror_cursors": [{"name": "koji-completed", "value": NOW}],
    "task_fetches": [
        {"task_id": "task-carried", "nvr": "crasher-1.0-1.fc40", "attempts": 1, "parked_at": NOW}
    ],
}


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    database = Database.from_url(store_url)
    yield database
    database.dispose()


def at_legacy(db: Database, revision: str) -> None:
    """The database as an earlier version left it: the old chain up to ``revision``."""
    with db.engine.begin() as conn:
        schema.LEGACY.upgrade(conn, revision)


def reflected(conn: sa.Connection, table: str) -> sa.Table:
    """``table`` as the database describes it (typed, so times read back as times)."""
    return sa.Table(table, sa.MetaData(), autoload_with=conn)


def fill_old_rows(db: Database) -> None:
    with db.engine.begin() as conn:
        for table, rows in OLD_ROWS.items():
            conn.execute(reflected(conn, table).insert(), rows)


def rows_of(db: Database, table: str, columns: list[str]) -> list[tuple[Any, ...]]:
    with db.engine.connect() as conn:
        found = reflected(conn, table)
        query = sa.select(*[found.c[c] for c in columns]).order_by(found.c[columns[0]])
        return [tuple(row) for row in conn.execute(query)]


def normal(value: Any) -> Any:
    # SQLite hands times back naive, PostgreSQL aware: both are UTC here.
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@pytest.mark.parametrize("old", ["0530", "0300"])
def test_a_database_of_the_single_chain_is_carried_over_without_losing_a_row(
    db: Database, old: str
) -> None:
    at_legacy(db, old)
    fill_old_rows(db)
    with pytest.raises(SchemaMismatch, match="retrace-admin migrate"):
        schema.check(db, schema.INTAKE)

    carried, done = schema.migrate(db)

    assert carried == old
    assert [(d.branch, d.before, d.after) for d in done] == [
        (branch.name, branch.baseline(), branch.head()) for branch in schema.ORDER
    ]
    assert not sa.inspect(db.engine).has_table("alembic_version")
    for table, rows in OLD_ROWS.items():
        columns = list(rows[0])
        kept = [tuple(normal(v) for v in row) for row in rows_of(db, table, columns)]
        assert kept == [tuple(row[c] for c in columns) for row in rows], table
    # Every service starts, and its data functions work on the carried rows.
    schema.check(db, schema.INTAKE, uses=(schema.MIRROR,))
    schema.check(db, schema.MIRROR)
    schema.check(db, schema.ANALYZER, uses=(schema.INTAKE, schema.MIRROR))
    data = Data.of(db)
    task = data.intake.get_task("task-carried")
    assert task is not None
    assert task.status == TaskStatus.RUNNING
    fetch = data.analyzer.task_fetch("task-carried")
    assert fetch is not None
    assert fetch.attempts == 1
    assert data.analyzer.park_task("task-carried", "crasher-1.0-1.fc40", 2, "Waiting")
    assert data.intake.get_task("task-carried").status == TaskStatus.QUEUED  # type: ignore[union-attr]
    [hit] = data.mirror.find_build_ids([BUILD_ID])
    assert hit.package.nevra == Nevra("crasher", 0, "1.0", "1.fc40", "x86_64")
    assert [p.id for p in data.mirror.build_packages(42)] == [7]
    build = data.mirror.get_build(42)
    assert build is not None
    assert build.state == SyncState.MIRRORED
    assert data.mirror.get_cursor("koji-completed") == NOW
    assert data.mirror.reindex_backlog() == 1  # indexed the old way: reindex reads it
    assert data.intake.password_failures_since("task-carried", "192.0.2.1", NOW) == 2
    # The foreign key survived the carry-over: forgetting the task forgets its fetch.
    data.intake.delete_task("task-carried")
    assert data.analyzer.task_fetch("task-carried") is None
    # Migrating again changes nothing.
    assert schema.migrate(db)[0] is None


def shape(db: Database) -> dict[str, Any]:
    """Every table's columns, keys and indexes, as the database reports them."""
    inspector = sa.inspect(db.engine)
    found = {}
    for table in sorted(inspector.get_table_names()):
        if table.startswith("alembic_version"):
            continue
        found[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in inspector.get_columns(table)
            ],
            "primary key": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign keys": sorted(
                (
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                    fk.get("options", {}).get("ondelete"),
                )
                for fk in inspector.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), i["unique"])
                for i in inspector.get_indexes(table)
            ),
            "unique": sorted(
                tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
            ),
        }
    return found


@pytest.fixture
def second_url(store_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Another empty database of the same kind as ``store_url``."""
    if store_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/second.sqlite3"
    make: Callable[[], str] = request.getfixturevalue("make_postgresql_url")
    return make()


def test_the_branches_create_exactly_what_the_single_chain_left(
    db: Database, second_url: str
) -> None:
    at_legacy(db, "0530")
    with db.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alembic_version"))
    fresh = Database.from_url(second_url)
    try:
        schema.migrate(fresh)
        assert shape(fresh) == shape(db)
        assert len(shape(fresh)) == 9
    finally:
        fresh.dispose()


def test_the_analyzer_tables_wait_for_the_intake_tables(db: Database) -> None:
    with pytest.raises(SchemaMismatch, match="retrace-admin migrate --service intake"):
        schema.migrate(db, [schema.ANALYZER])
    assert [d.branch for d in schema.migrate(db, [schema.INTAKE])[1]] == ["intake"]
    schema.check(db, schema.INTAKE)
    # The intake reads the mirror's releases: it says which branch is missing.
    with pytest.raises(SchemaMismatch, match="retrace-admin migrate --service mirror"):
        schema.check(db, schema.INTAKE, uses=(schema.MIRROR,))
    schema.migrate(db, [schema.ANALYZER])
    schema.check(db, schema.ANALYZER)


def test_retrace_admin_migrate_says_what_it_did_per_branch(store_url: str, tmp_path: Path) -> None:
    stack = Stack(
        tmp_path / "home", "amqp://guest:guest@127.0.0.1:5672/", {"RETRACE_STORE__URL": store_url}
    )
    stack.write_settings()
    db = Database.from_url(store_url)
    try:
        at_legacy(db, "0530")
    finally:
        db.dispose()
    one = stack.command("retrace-admin", "migrate", "--service", "mirror")
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines() == [
        "database schema: carried over from the single chain at 0530",
        f"mirror schema: {schema.MIRROR.baseline()} -> {schema.MIRROR.head()}",
    ]
    every = stack.command("retrace-admin", "migrate")
    assert every.returncode == 0, every.stderr
    assert every.stdout.splitlines() == [
        f"{b.name} schema: {b.head()} -> {b.head()}" for b in schema.ORDER
    ]


# -- rolling upgrades ---------------------------------------------------------------

SYNTHETIC = {
    # A nullable column on the branch's own table: old code neither reads nor writes it.
    "intake": 'op.add_column("tasks", sa.Column("synthetic_note", sa.Text))',
    "analyzer": 'op.add_column("task_fetches", sa.Column("synthetic_note", sa.Text))',
    # A new table of the branch.
    "mirror": 'op.create_table("mirror_synthetic", sa.Column("id", sa.Integer, primary_key=True))',
}


def next_revision(branch: schema.Branch, folder: Path) -> schema.Branch:
    """``branch`` as the next version of its service knows it: one revision more."""
    folder.mkdir(parents=True)
    revision = f"{branch.name}_next"
    (folder / f"{revision}.py").write_text(
        f'"""A synthetic next revision of the {branch.name} branch."""\n\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"revision = {revision!r}\ndown_revision = {branch.head()!r}\n"
        "branch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade() -> None:\n    {SYNTHETIC[branch.name]}\n"
    )
    return dataclasses.replace(branch, extra_locations=(folder,))


def works_as_analyzer(data: Data, analyzer: schema.Branch, task_id: str) -> None:
    """What the analyzer does with the intake's, its own and the mirror's tables."""
    schema.check(data.db, analyzer, uses=(schema.INTAKE, schema.MIRROR))
    data.intake.create_task(task_id, "d" * 64, "x86_64", "retrace", "queued")
    assert data.intake.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.RUNNING)
    assert data.analyzer.park_task(task_id, "crasher-1.0-1.fc40", 1, "Waiting for the build")
    [(task, fetch)] = data.analyzer.tasks_waiting_for("crasher-1.0-1.fc40")
    assert (task.id, task.status, fetch.attempts) == (task_id, TaskStatus.QUEUED, 1)
    assert data.analyzer.wake_task(task_id, 1, "copy-1")
    assert data.intake.move_task(task_id, [TaskStatus.QUEUED], TaskStatus.RUNNING)
    assert data.intake.move_task(task_id, [TaskStatus.RUNNING], TaskStatus.SUCCESS)
    assert data.mirror.find_build_ids([BUILD_ID])


def works_as_mirror(data: Data, mirror: schema.Branch, name: str) -> None:
    """What the mirror does with its tables."""
    schema.check(data.db, mirror)
    nevra = Nevra(name, 0, "1.0", "1.fc40", "x86_64")
    entries = [IndexEntry(BUILD_ID, BuildIdKind.BINARY, f"/usr/bin/{name}", IndexSource.ELF)]
    package, new = data.mirror.add_package(
        nevra, "fedora-40", f"p/{name}.rpm", "0" * 64, 1, entries
    )
    assert new
    data.mirror.record_build(
        len(name), f"{name}-1.0-1.fc40", "fedora-40", SyncState.MIRRORED, package_ids=[package.id]
    )
    assert data.mirror.holds_build(name, "1.0", "1.fc40")


def works_as_intake(data: Data, intake: schema.Branch, task_id: str) -> None:
    """What the intake does with its tables and the mirror's."""
    schema.check(data.db, intake, uses=(schema.MIRROR,))
    data.intake.create_task(task_id, "d" * 64, "x86_64", "retrace", "queued")
    assert data.intake.rotate_password(task_id, "d" * 64, "e" * 64)
    assert data.intake.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
    assert data.intake.count_tasks([TaskStatus.QUEUED]) >= 1
    assert ("fedora-40", "x86_64") in data.mirror.mirrored_releases()


def test_a_rolling_upgrade_one_service_ahead_of_the_others_and_back(
    db: Database, tmp_path: Path
) -> None:
    schema.migrate(db)
    data = Data.of(db)
    works_as_mirror(data, schema.MIRROR, "crasher")

    # The intake is upgraded first: its branch gets a revision the others never saw.
    intake_next = next_revision(schema.INTAKE, tmp_path / "intake")
    [step] = schema.migrate(db, [intake_next])[1]
    assert (step.before, step.after) == (schema.INTAKE.head(), "intake_next")
    # The analyzer and the mirror, one intake revision behind, keep working...
    works_as_analyzer(data, schema.ANALYZER, "task-during-upgrade")
    works_as_mirror(data, schema.MIRROR, "other")
    # ... the new intake runs; an intake of the old version would not start.
    works_as_intake(data, intake_next, "task-new-intake")
    with pytest.raises(SchemaMismatch, match="branch but this version of the intake needs"):
        schema.check(db, schema.INTAKE)

    # The reverse: the mirror and the analyzer move ahead; the upgraded intake, now
    # behind them, keeps working, and so do they.
    mirror_next = next_revision(schema.MIRROR, tmp_path / "mirror")
    analyzer_next = next_revision(schema.ANALYZER, tmp_path / "analyzer")
    schema.migrate(db, [mirror_next, analyzer_next])
    works_as_intake(data, intake_next, "task-after-upgrade")
    schema.check(db, analyzer_next, uses=(intake_next, mirror_next))
    works_as_analyzer(data, analyzer_next, "task-all-upgraded")
    works_as_mirror(data, mirror_next, "third")
    with pytest.raises(SchemaMismatch, match="--service analyzer"):
        schema.check(db, schema.ANALYZER)
