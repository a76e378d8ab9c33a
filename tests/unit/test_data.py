"""The data modules: migrations per owner, the start-up check, guarded task moves,
the package index.

Every test runs on SQLite and on PostgreSQL.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from services.common.data import analyzer, intake, mirror, schema
from services.common.data.db import Database
from services.common.data.intake import TaskStatus
from services.common.data.mirror import BuildIdKind, IndexEntry, IndexSource, Nevra
from services.common.data.schema import SchemaMismatch
from tests.data import Data


@pytest.fixture
def store(store_url: str) -> Iterator[Data]:
    store = Data.from_url(store_url)
    store.migrate()
    yield store
    store.engine.dispose()


def test_an_empty_database_is_refused_with_what_to_do(tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path}/empty.sqlite3")
    with pytest.raises(SchemaMismatch, match=r"retrace-admin migrate --service intake"):
        schema.check(db, schema.INTAKE)


@pytest.mark.parametrize(
    ("branch", "metadata"),
    [
        (schema.INTAKE, intake.metadata),
        (schema.MIRROR, mirror.metadata),
        (schema.ANALYZER, analyzer.metadata),
    ],
)
def test_each_branch_creates_exactly_the_tables_its_module_uses(
    store: Data, branch: schema.Branch, metadata: sa.MetaData
) -> None:
    schema.check(store.db, branch)
    with store.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    ours = set(metadata.tables)

    def concerns_us(diff: tuple[object, ...]) -> bool:
        kind, what = diff[0], diff[1]
        if kind in ("add_index", "remove_index"):
            return False  # indexes are the migrations' business
        if kind == "remove_table":
            return isinstance(what, sa.Table) and what.name in ours
        if kind == "remove_fk" and isinstance(what, sa.ForeignKeyConstraint):
            # task_fetches -> tasks lives in the migrations only (see analyzer_0001).
            return what.referred_table.name != "tasks"
        return True

    # Tables and columns of the branch's own tables must agree exactly.
    assert [d for d in differences if not isinstance(d, list) and concerns_us(d)] == []
    assert [d for d in differences if isinstance(d, list)] == []


def test_migrate_twice_changes_nothing(store: Data) -> None:
    carried, done = schema.migrate(store.db)
    assert carried is None
    assert [(d.branch, d.before, d.after) for d in done] == [
        (b.name, b.head(), b.head()) for b in schema.ORDER
    ]


def test_only_the_first_of_two_attempts_finishes_a_task(store: Data) -> None:
    store.intake.create_task("task-0001", "d" * 64, "x86_64", "retrace", "queued")
    assert store.intake.move_task("task-0001", [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
    assert store.intake.move_task("task-0001", [TaskStatus.QUEUED], TaskStatus.RUNNING)
    assert store.intake.move_task("task-0001", [TaskStatus.RUNNING], TaskStatus.SUCCESS)
    assert not store.intake.move_task("task-0001", [TaskStatus.RUNNING], TaskStatus.FAILURE)
    task = store.intake.get_task("task-0001")
    assert task is not None
    assert task.status == TaskStatus.SUCCESS
    assert task.started_at is not None
    assert task.finished_at is not None


def test_a_package_is_recorded_once_with_its_build_ids(store: Data) -> None:
    nevra = Nevra("crasher", 0, "1.0", "1.fc40", "x86_64")
    entries = [IndexEntry("ab" * 20, BuildIdKind.BINARY, "/usr/bin/crasher", IndexSource.ELF)]
    first, new = store.mirror.add_package(nevra, "fedora-40", "p/c.rpm", "0" * 64, 10, entries)
    again, new_again = store.mirror.add_package(
        nevra, "fedora-40", "p/c.rpm", "0" * 64, 10, entries
    )
    assert new
    assert not new_again
    assert again == first
    hits = store.mirror.find_build_ids(["ab" * 20, "cd" * 20])
    assert [(h.package, h.kind, h.path) for h in hits] == [
        (first, BuildIdKind.BINARY, "/usr/bin/crasher")
    ]
    assert hits[0].package.path == "p/c.rpm"


def test_a_package_indexed_the_old_way_is_reindexed_once_with_its_build(store: Data) -> None:
    nevra = Nevra("foo-cli", 0, "4.2", "3.fc40", "x86_64")
    link = IndexEntry("ab" * 20, BuildIdKind.BINARY, "/usr/bin/foo")
    old, _ = store.mirror.add_package(nevra, "fedora-40", "p/f.rpm", "0" * 64, 10, [link], None, 0)
    assert store.mirror.reindex_backlog() == 1
    assert [p.id for p in store.mirror.packages_to_reindex()] == [old.id]
    note = IndexEntry("cd" * 20, BuildIdKind.BINARY, "/usr/bin/foo", IndexSource.ELF)
    lib = IndexEntry("ef" * 20, BuildIdKind.BINARY, "/usr/lib64/libfoo.so.1", IndexSource.ELF)
    assert store.mirror.reindex_package(old.id, [note, lib], "foo-4.2-3.fc40", conflicts=1)
    assert store.mirror.reindex_backlog() == 0
    assert store.mirror.index_conflicts() == 1
    # The ELF note replaced the link it contradicted; the build is known now.
    assert store.mirror.find_build_ids(["ab" * 20]) == []
    hits = store.mirror.find_paths(["/usr/bin/foo", "/usr/lib64/libfoo.so.1"], [BuildIdKind.BINARY])
    assert {(h.build_id, h.path) for h in hits} == {
        ("cd" * 20, "/usr/bin/foo"),
        ("ef" * 20, "/usr/lib64/libfoo.so.1"),
    }
    assert [p.nevra for p in store.mirror.build_of("foo-4.2-3.fc40", "x86_64")] == [nevra]
    assert store.mirror.build_of("foo-4.2-3.fc40", "aarch64") == []


def test_a_different_file_under_a_known_nevra_is_refused(store: Data) -> None:
    nevra = Nevra("crasher", 0, "1.0", "1.fc40", "x86_64")
    store.mirror.add_package(nevra, "fedora-40", "p/c.rpm", "0" * 64, 10, [])
    with pytest.raises(ValueError, match="different content"):
        store.mirror.add_package(nevra, "fedora-40", "p/c.rpm", "1" * 64, 10, [])


def test_nevra_prints_as_rpm_does() -> None:
    assert str(Nevra("glibc", 0, "2.36", "9.fc40", "x86_64")) == "glibc-2.36-9.fc40.x86_64"
    assert str(Nevra("bash", 2, "5.2", "1.fc40", "x86_64")) == "bash-2:5.2-1.fc40.x86_64"


def test_a_task_waiting_for_its_build_is_parked_once_and_woken_once(store: Data) -> None:
    store.intake.create_task("waiting-1", "digest", "x86_64", "retrace", "queued")
    assert store.intake.move_task("waiting-1", [TaskStatus.SUBMITTING], TaskStatus.RUNNING)
    assert store.analyzer.park_task(
        "waiting-1", "crasher-1.0-2.fc40", 1, "Downloading remote resources"
    )
    # A second copy of the same command cannot park it again.
    assert not store.analyzer.park_task("waiting-1", "crasher-1.0-2.fc40", 1, "again")
    task = store.intake.get_task("waiting-1")
    assert task is not None
    assert (task.status, task.progress) == (TaskStatus.QUEUED, "Downloading remote resources")
    [(waiting, fetch)] = store.analyzer.tasks_waiting_for("crasher-1.0-2.fc40")
    assert (waiting.id, fetch.attempts, fetch.woken_by) == ("waiting-1", 1, None)
    assert store.analyzer.tasks_waiting_for("crasher-1.0-1.fc40") == []

    assert store.analyzer.wake_task("waiting-1", 1, "republished")
    assert not store.analyzer.wake_task("waiting-1", 1, "from-the-wait-queue")
    assert store.analyzer.wake_task("waiting-1", 1, "republished")  # its redelivery
    assert store.analyzer.tasks_waiting_for("crasher-1.0-2.fc40") == []

    # The woken copy finds the build still missing and parks the task again.
    assert store.intake.move_task("waiting-1", [TaskStatus.QUEUED], TaskStatus.RUNNING)
    assert not store.analyzer.park_task("waiting-1", "crasher-1.0-2.fc40", 3, "skipped one")
    assert store.analyzer.park_task("waiting-1", "crasher-1.0-2.fc40", 2, "second request")
    assert not store.analyzer.wake_task("waiting-1", 1, "a stale copy")
    again = store.analyzer.task_fetch("waiting-1")
    assert again is not None
    assert (again.attempts, again.woken_by) == (2, None)

    store.intake.delete_task("waiting-1")
    assert store.analyzer.task_fetch("waiting-1") is None


def test_only_a_running_task_is_parked(store: Data) -> None:
    store.intake.create_task("finished-1", "digest", "x86_64", "retrace", "queued")
    assert store.intake.move_task("finished-1", [TaskStatus.SUBMITTING], TaskStatus.FAILURE)
    assert not store.analyzer.park_task("finished-1", "crasher-1.0-2.fc40", 1, "too late")
    assert store.analyzer.task_fetch("finished-1") is None
