"""The store: migrations, the revision check, guarded task moves, the package index.

Every test runs on SQLite and on PostgreSQL.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from services.common.store import (
    BuildIdKind,
    IndexEntry,
    IndexSource,
    Nevra,
    SchemaMismatch,
    Store,
    TaskStatus,
    metadata,
)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    store = Store.from_url(store_url)
    store.migrate()
    yield store
    store.engine.dispose()


def test_an_empty_database_is_refused_with_what_to_do(tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite:///{tmp_path}/empty.sqlite3")
    with pytest.raises(SchemaMismatch, match="retrace-admin migrate"):
        store.check_revision()


def test_the_migrations_create_exactly_the_tables_the_code_uses(store: Store) -> None:
    store.check_revision()
    with store.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    # Indexes are the migrations' business; tables and columns must agree exactly.
    assert [d for d in differences if d[0] not in ("add_index", "remove_index")] == []


def test_migrate_twice_changes_nothing(store: Store) -> None:
    assert store.migrate() == store.head_revision()


def test_only_the_first_of_two_attempts_finishes_a_task(store: Store) -> None:
    store.create_task("task-0001", "d" * 64, "x86_64", "retrace", "queued")
    assert store.move_task("task-0001", [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
    assert store.move_task("task-0001", [TaskStatus.QUEUED], TaskStatus.RUNNING)
    assert store.move_task("task-0001", [TaskStatus.RUNNING], TaskStatus.SUCCESS)
    assert not store.move_task("task-0001", [TaskStatus.RUNNING], TaskStatus.FAILURE)
    task = store.get_task("task-0001")
    assert task is not None
    assert task.status == TaskStatus.SUCCESS
    assert task.started_at is not None
    assert task.finished_at is not None


def test_a_package_is_recorded_once_with_its_build_ids(store: Store) -> None:
    nevra = Nevra("crasher", 0, "1.0", "1.fc40", "x86_64")
    entries = [IndexEntry("ab" * 20, BuildIdKind.BINARY, "/usr/bin/crasher", IndexSource.ELF)]
    first, new = store.add_package(nevra, "fedora-40", "p/c.rpm", "0" * 64, 10, entries)
    again, new_again = store.add_package(nevra, "fedora-40", "p/c.rpm", "0" * 64, 10, entries)
    assert new
    assert not new_again
    assert again == first
    hits = store.find_build_ids(["ab" * 20, "cd" * 20])
    assert [(h.package, h.kind, h.path) for h in hits] == [
        (first, BuildIdKind.BINARY, "/usr/bin/crasher")
    ]
    assert hits[0].package.path == "p/c.rpm"


def test_a_package_indexed_the_old_way_is_reindexed_once_with_its_build(store: Store) -> None:
    nevra = Nevra("foo-cli", 0, "4.2", "3.fc40", "x86_64")
    link = IndexEntry("ab" * 20, BuildIdKind.BINARY, "/usr/bin/foo")
    old, _ = store.add_package(nevra, "fedora-40", "p/f.rpm", "0" * 64, 10, [link], None, 0)
    assert store.reindex_backlog() == 1
    assert [p.id for p in store.packages_to_reindex()] == [old.id]
    note = IndexEntry("cd" * 20, BuildIdKind.BINARY, "/usr/bin/foo", IndexSource.ELF)
    lib = IndexEntry("ef" * 20, BuildIdKind.BINARY, "/usr/lib64/libfoo.so.1", IndexSource.ELF)
    assert store.reindex_package(old.id, [note, lib], "foo-4.2-3.fc40", conflicts=1)
    assert store.reindex_backlog() == 0
    assert store.index_conflicts() == 1
    # The ELF note replaced the link it contradicted; the build is known now.
    assert store.find_build_ids(["ab" * 20]) == []
    hits = store.find_paths(["/usr/bin/foo", "/usr/lib64/libfoo.so.1"], [BuildIdKind.BINARY])
    assert {(h.build_id, h.path) for h in hits} == {
        ("cd" * 20, "/usr/bin/foo"),
        ("ef" * 20, "/usr/lib64/libfoo.so.1"),
    }
    assert [p.nevra for p in store.build_of("foo-4.2-3.fc40", "x86_64")] == [nevra]
    assert store.build_of("foo-4.2-3.fc40", "aarch64") == []


def test_a_different_file_under_a_known_nevra_is_refused(store: Store) -> None:
    nevra = Nevra("crasher", 0, "1.0", "1.fc40", "x86_64")
    store.add_package(nevra, "fedora-40", "p/c.rpm", "0" * 64, 10, [])
    with pytest.raises(ValueError, match="different content"):
        store.add_package(nevra, "fedora-40", "p/c.rpm", "1" * 64, 10, [])


def test_nevra_prints_as_rpm_does() -> None:
    assert str(Nevra("glibc", 0, "2.36", "9.fc40", "x86_64")) == "glibc-2.36-9.fc40.x86_64"
    assert str(Nevra("bash", 2, "5.2", "1.fc40", "x86_64")) == "bash-2:5.2-1.fc40.x86_64"


def test_a_task_waiting_for_its_build_is_parked_once_and_woken_once(store: Store) -> None:
    store.create_task("waiting-1", "digest", "x86_64", "retrace", "queued")
    assert store.move_task("waiting-1", [TaskStatus.SUBMITTING], TaskStatus.RUNNING)
    assert store.park_task("waiting-1", "crasher-1.0-2.fc40", 1, "Downloading remote resources")
    # A second copy of the same command cannot park it again.
    assert not store.park_task("waiting-1", "crasher-1.0-2.fc40", 1, "again")
    task = store.get_task("waiting-1")
    assert task is not None
    assert (task.status, task.progress) == (TaskStatus.QUEUED, "Downloading remote resources")
    [(waiting, fetch)] = store.tasks_waiting_for("crasher-1.0-2.fc40")
    assert (waiting.id, fetch.attempts, fetch.woken_by) == ("waiting-1", 1, None)
    assert store.tasks_waiting_for("crasher-1.0-1.fc40") == []

    assert store.wake_task("waiting-1", 1, "republished")
    assert not store.wake_task("waiting-1", 1, "from-the-wait-queue")
    assert store.wake_task("waiting-1", 1, "republished")  # its redelivery
    assert store.tasks_waiting_for("crasher-1.0-2.fc40") == []

    # The woken copy finds the build still missing and parks the task again.
    assert store.move_task("waiting-1", [TaskStatus.QUEUED], TaskStatus.RUNNING)
    assert not store.park_task("waiting-1", "crasher-1.0-2.fc40", 3, "skipped one")
    assert store.park_task("waiting-1", "crasher-1.0-2.fc40", 2, "second request")
    assert not store.wake_task("waiting-1", 1, "a stale copy")
    again = store.task_fetch("waiting-1")
    assert again is not None
    assert (again.attempts, again.woken_by) == (2, None)

    store.delete_task("waiting-1")
    assert store.task_fetch("waiting-1") is None


def test_only_a_running_task_is_parked(store: Store) -> None:
    store.create_task("finished-1", "digest", "x86_64", "retrace", "queued")
    assert store.move_task("finished-1", [TaskStatus.SUBMITTING], TaskStatus.FAILURE)
    assert not store.park_task("finished-1", "crasher-1.0-2.fc40", 1, "too late")
    assert store.task_fetch("finished-1") is None
