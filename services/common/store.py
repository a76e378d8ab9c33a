"""The store: tasks, mirrored packages and their build-ids, in one SQL schema.

SQLite on one machine, PostgreSQL at scale; the schema is created and changed only
by the migrations under ``migrations/`` (``retrace-admin migrate``).  Services call
:meth:`Store.check_revision` at start and refuse to run on a mismatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("password_digest", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("task_type", sa.String(16), nullable=False),
    sa.Column("arch", sa.String(32), nullable=False),
    sa.Column("progress", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("crash_function", sa.Text),
    sa.Column("crash_module", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    # Single-use passwords: the one just replaced, when, and how often it was replayed.
    sa.Column("previous_digest", sa.String(64)),
    sa.Column("rotated_at", sa.DateTime(timezone=True)),
    sa.Column("previous_replays", sa.Integer, nullable=False, server_default="0"),
    # The folder of the task's results in its spool folder, named by the update that
    # finished the task, once its files were on disk (migration 0510).
    sa.Column("results", sa.String(64)),
    # The analyzer working on a running task ("host:pid") and when it last said so
    # (migration 0530).
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_at", sa.DateTime(timezone=True)),
)

# Wrong passwords per task and client address, in a window, so every worker agrees.
password_failures = sa.Table(
    "password_failures",
    metadata,
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.PrimaryKeyConstraint("task_id", "client"),
)

# Uploads being received, per client address, across every intake worker.
uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    # The upload's lease (migration 0520): the spool folder it fills, the intake worker
    # receiving it (host, pid) and when that worker last said it still was.
    sa.Column("task_id", sa.String(64)),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("renewed_at", sa.DateTime(timezone=True)),
)

packages = sa.Table(
    "packages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("release", sa.Text, nullable=False),
    sa.Column("arch", sa.String(32), nullable=False),
    sa.Column("os_release", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
    # The build the package came from: its source RPM's NVR (migration 0400).
    sa.Column("source_nvr", sa.Text),
    # How its build-ids were read: see INDEX_VERSION (migration 0400).
    sa.Column("index_version", sa.Integer, nullable=False, server_default="0"),
    # How many of its header's .build-id links its ELF files contradicted.
    sa.Column("index_conflicts", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("os_release", "name", "epoch", "version", "release", "arch"),
)

INDEX_VERSION = 1
"""Packages whose ``index_version`` is lower were indexed from their header's
``.build-id`` links alone; ``retrace-mirror reindex`` reads their ELF files."""

build_ids = sa.Table(
    "build_ids",
    metadata,
    sa.Column("build_id", sa.String(128), nullable=False),
    sa.Column(
        "package_id", sa.Integer, sa.ForeignKey("packages.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    # Where the entry was read: "elf" (the file's own note) or "header" (a .build-id link).
    sa.Column("source", sa.String(8), nullable=False, server_default="header"),
    sa.PrimaryKeyConstraint("build_id", "package_id", "path"),
)

# The mirror's own tables (migration 0100): which Koji build brought which packages,
# and how far the catch-up with Koji has come.
koji_builds = sa.Table(
    "koji_builds",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("nvr", sa.Text, nullable=False),
    sa.Column("os_release", sa.String(64)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
)

koji_build_packages = sa.Table(
    "koji_build_packages",
    metadata,
    sa.Column(
        "build_id", sa.Integer, sa.ForeignKey("koji_builds.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column(
        "package_id", sa.Integer, sa.ForeignKey("packages.id", ondelete="CASCADE"), nullable=False
    ),
    sa.PrimaryKeyConstraint("build_id", "package_id"),
)

mirror_cursors = sa.Table(
    "mirror_cursors",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.DateTime(timezone=True), nullable=False),
)

# Tasks waiting for the mirror to fetch their crashed build (migration 0300): how many
# times each asked, and which copy of its command woke it (a message id).
task_fetches = sa.Table(
    "task_fetches",
    metadata,
    sa.Column(
        "task_id",
        sa.String(64),
        sa.ForeignKey("tasks.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("nvr", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("woken_by", sa.String(64)),
    sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
)


class TaskStatus(StrEnum):
    """A task's life: submitting → queued → running → success | failure."""

    SUBMITTING = "submitting"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"

    @property
    def final(self) -> bool:
        """Whether the task has ended."""
        return self in (TaskStatus.SUCCESS, TaskStatus.FAILURE)


class BuildIdKind(StrEnum):
    """What file of a package a build-id entry names."""

    BINARY = "binary"
    """The program or library itself."""
    DEBUG = "debug"
    """Its separate debug file."""
    DWZ = "dwz"
    """Shared DWARF under ``/usr/lib/debug/.dwz/`` that debug files point to."""
    BINARY_PATH = "binary-path"
    """Not a file of this package: a debuginfo package's ``.build-id`` link naming
    where the binary of that build-id is installed (by another package of the build)."""


class IndexSource(StrEnum):
    """Where a build-id entry was read."""

    ELF = "elf"
    HEADER = "header"


@dataclass(frozen=True)
class IndexEntry:
    """One build-id entry of a package, as the mirror indexes it."""

    build_id: str
    kind: BuildIdKind
    path: str
    source: IndexSource = IndexSource.HEADER


class SyncState(StrEnum):
    """What the mirror did with a Koji build (``koji_builds.state``)."""

    MIRRORED = "mirrored"
    """Every wanted package of it is in the repository and the index."""
    REMOVED = "removed"
    """Deleted in Koji, and removed here (``delete_on_deleted``)."""
    SKIPPED = "skipped"
    """Not mirrored on purpose: the settings do not want it, or there was nothing to do."""
    FAILED = "failed"
    """Given up on: its command was dead-lettered, with the reason."""


class SchemaMismatch(Exception):
    """The database is not at the revision this code was written for."""


class PackageConflict(ValueError):
    """A different file is already recorded under the same NEVRA and release."""


@dataclass(frozen=True)
class Task:
    """One row of ``tasks``."""

    id: str
    password_digest: str
    status: TaskStatus
    task_type: str
    arch: str
    progress: str
    reason: str | None
    crash_function: str | None
    crash_module: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    previous_digest: str | None = None
    rotated_at: datetime | None = None
    previous_replays: int = 0
    results: str | None = None
    """The folder of its results in its spool folder (``None``: none, or the plain
    ``results`` of a task finished before migration 0510)."""
    lease_owner: str | None = None
    lease_at: datetime | None = None

    def held_by_other(self, owner: str, fresh_after: datetime) -> bool:
        """Whether another live analyzer works on this task (its lease is fresh)."""
        return (
            self.status == TaskStatus.RUNNING
            and self.lease_owner is not None
            and self.lease_owner != owner
            and self.lease_at is not None
            and aware(self.lease_at) > fresh_after
        )


@dataclass(frozen=True)
class Nevra:
    """Name, epoch, version, release and architecture of one RPM."""

    name: str
    epoch: int
    version: str
    release: str
    arch: str

    def __str__(self) -> str:
        epoch = f"{self.epoch}:" if self.epoch else ""
        return f"{self.name}-{epoch}{self.version}-{self.release}.{self.arch}"


@dataclass(frozen=True)
class Package:
    """One mirrored RPM."""

    id: int
    nevra: Nevra
    os_release: str
    path: str
    sha256: str
    size: int
    source_nvr: str | None = None
    """The build it came from (its source RPM's NVR), when the index knows it."""


@dataclass(frozen=True)
class BuildIdHit:
    """A package file that carries a build-id."""

    build_id: str
    kind: BuildIdKind
    path: str
    package: Package


@dataclass(frozen=True)
class KojiBuild:
    """One row of ``koji_builds``: what the mirror did with a Koji build."""

    id: int
    nvr: str
    os_release: str | None
    state: SyncState
    reason: str | None
    completed_at: datetime | None
    synced_at: datetime


@dataclass(frozen=True)
class TaskFetch:
    """One row of ``task_fetches``: a task that asked the mirror for its crashed build."""

    task_id: str
    nvr: str
    attempts: int
    woken_by: str | None
    parked_at: datetime


class _Superseded(Exception):
    """Rolls back a transaction whose guard found another attempt ahead of it."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """``moment`` as an aware UTC time: SQLite hands back naive ones, PostgreSQL aware."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _enable_sqlite_concurrency(dbapi_conn: Any, _record: Any) -> None:
    # Several processes share one SQLite file: WAL lets readers work during a write,
    # and foreign keys must be switched on per connection.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def create_engine(url: str) -> Engine:
    """An engine for ``url``, set up for several processes sharing the database."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _enable_sqlite_concurrency)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def _alembic_config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


class Store:
    """Access to the database; every method is one short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> Store:
        """A store on the database at ``url``."""
        return cls(create_engine(url))

    # -- schema ---------------------------------------------------------------

    def migrate(self) -> str:
        """Bring the schema up to the newest revision; return that revision."""
        with self.engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "head")
        return self.head_revision()

    def head_revision(self) -> str:
        """The revision this code expects."""
        head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
        assert head is not None
        return head

    def current_revision(self) -> str | None:
        """The revision the database is at (``None`` for an empty database)."""
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def check_revision(self) -> None:
        """Raise :class:`SchemaMismatch`, saying what to do, unless the schema is current."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise SchemaMismatch(
                f"the database is at schema revision {current or 'none (empty)'} but this "
                f"version of Retrace Server needs {head}: run 'retrace-admin migrate'"
            )

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- tasks ----------------------------------------------------------------

    def create_task(
        self, task_id: str, password_digest: str, arch: str, task_type: str, progress: str
    ) -> None:
        """Record a new task in the ``submitting`` state."""
        with self._tx() as conn:
            conn.execute(
                tasks.insert().values(
                    id=task_id,
                    password_digest=password_digest,
                    status=TaskStatus.SUBMITTING,
                    task_type=task_type,
                    arch=arch,
                    progress=progress,
                    created_at=_utcnow(),
                )
            )

    def get_task(self, task_id: str) -> Task | None:
        """The task ``task_id``, or ``None`` if there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(tasks.select().where(tasks.c.id == task_id)).mappings().first()
        if row is None:
            return None
        return _task(row)

    def move_task(
        self,
        task_id: str,
        allowed_from: Iterable[TaskStatus],
        to: TaskStatus,
        **fields: Any,
    ) -> bool:
        """Move a task to ``to`` only if it is in one of ``allowed_from``.

        This guarded update is how two deliveries of the same command, or a late
        one, end with exactly one result: only the first mover wins.
        """
        values: dict[str, Any] = {"status": to, **fields}
        if to == TaskStatus.RUNNING:
            values.setdefault("started_at", _utcnow())
        if to.final:
            values.setdefault("finished_at", _utcnow())
        with self._tx() as conn:
            result = conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status.in_(list(allowed_from)))
                .values(**values)
            )
        return result.rowcount == 1

    def renew_lease(self, task_id: str, owner: str) -> bool:
        """Say again that ``owner`` works on running task ``task_id``; whether it still does."""
        with self._tx() as conn:
            done = conn.execute(
                tasks.update()
                .where(
                    tasks.c.id == task_id,
                    tasks.c.status == TaskStatus.RUNNING,
                    tasks.c.lease_owner == owner,
                )
                .values(lease_at=_utcnow())
            )
        return done.rowcount == 1

    def release_lease(self, task_id: str, owner: str) -> None:
        """``owner`` no longer works on ``task_id`` (it finished, failed or gave it back)."""
        with self._tx() as conn:
            conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.lease_owner == owner)
                .values(lease_owner=None, lease_at=None)
            )

    def requeue_task(self, task_id: str, progress: str) -> bool:
        """Put a running task back to ``queued`` for a retry later; whether it was running.

        A task that once waited for its build is made wakeable again, so that the
        retry's own copy of its command may run it (see :meth:`wake_task`).
        """
        with self._tx() as conn:
            moved = conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status == TaskStatus.RUNNING)
                .values(status=TaskStatus.QUEUED, progress=progress)
            )
            if moved.rowcount != 1:
                return False
            conn.execute(
                task_fetches.update().where(task_fetches.c.task_id == task_id).values(woken_by=None)
            )
        return True

    def set_progress(self, task_id: str, progress: str) -> None:
        """Record the one-line progress shown by ``GET /<id>``."""
        with self._tx() as conn:
            conn.execute(tasks.update().where(tasks.c.id == task_id).values(progress=progress))

    def delete_task(self, task_id: str) -> None:
        """Forget a task."""
        with self._tx() as conn:
            conn.execute(tasks.delete().where(tasks.c.id == task_id))

    def count_tasks(self, statuses: Iterable[TaskStatus]) -> int:
        """How many tasks are in one of ``statuses``."""
        query = sa.select(sa.func.count()).where(tasks.c.status.in_(list(statuses)))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def count_tasks_by_status(self) -> dict[TaskStatus, int]:
        """The number of tasks in each state (every state present, zero included)."""
        query = sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)
        counts = dict.fromkeys(TaskStatus, 0)
        with self.engine.connect() as conn:
            for status, count in conn.execute(query):
                counts[TaskStatus(status)] = int(count)
        return counts

    def tasks_older_than(self, status: TaskStatus, before: datetime) -> list[Task]:
        """Tasks in ``status`` created (or, for final states, finished) before ``before``."""
        column = tasks.c.finished_at if status.final else tasks.c.created_at
        query = tasks.select().where(tasks.c.status == status, column < before)
        with self.engine.connect() as conn:
            return [_task(row) for row in conn.execute(query).mappings()]

    def delete_task_if(self, task_id: str, status: TaskStatus) -> bool:
        """Forget a task only if it is still in ``status``; whether it was deleted."""
        with self._tx() as conn:
            result = conn.execute(
                tasks.delete().where(tasks.c.id == task_id, tasks.c.status == status)
            )
        return result.rowcount == 1

    # -- tasks waiting for a build --------------------------------------------

    def task_fetch(self, task_id: str) -> TaskFetch | None:
        """Whether, for which build and how often task ``task_id`` asked the mirror."""
        query = task_fetches.select().where(task_fetches.c.task_id == task_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else TaskFetch(**row)

    def park_task(self, task_id: str, nvr: str, attempt: int, progress: str) -> bool:
        """Record the ``attempt``-th request of a running task for build ``nvr`` and
        move the task back to ``queued``, in one transaction.

        Guarded: nothing changes (``False``) unless the task is running and its
        previous request was the ``attempt - 1``-th, so of two copies of one command
        only one parks the task.
        """
        now = _utcnow()
        try:
            with self._tx() as conn:
                if attempt == 1:
                    conn.execute(
                        task_fetches.insert().values(
                            task_id=task_id, nvr=nvr, attempts=1, woken_by=None, parked_at=now
                        )
                    )
                else:
                    done = conn.execute(
                        task_fetches.update()
                        .where(
                            task_fetches.c.task_id == task_id,
                            task_fetches.c.attempts == attempt - 1,
                        )
                        .values(nvr=nvr, attempts=attempt, woken_by=None, parked_at=now)
                    )
                    if done.rowcount != 1:
                        raise _Superseded
                moved = conn.execute(
                    tasks.update()
                    .where(tasks.c.id == task_id, tasks.c.status == TaskStatus.RUNNING)
                    .values(status=TaskStatus.QUEUED, progress=progress)
                )
                if moved.rowcount != 1:
                    raise _Superseded
        except (_Superseded, sa.exc.IntegrityError):
            return False
        return True

    def wake_task(self, task_id: str, attempt: int, token: str) -> bool:
        """Let the copy ``token`` of a parked task's command run it; whether it may.

        The first copy of the ``attempt``-th wait to get here wins (the build-synced
        republish or the wait queue's own copy); the other finds the task woken and
        does nothing.  A redelivery of the winner (same ``token``) wins again.
        """
        with self._tx() as conn:
            done = conn.execute(
                task_fetches.update()
                .where(
                    task_fetches.c.task_id == task_id,
                    task_fetches.c.attempts == attempt,
                    sa.or_(task_fetches.c.woken_by.is_(None), task_fetches.c.woken_by == token),
                )
                .values(woken_by=token)
            )
        return done.rowcount == 1

    def tasks_waiting_for(self, nvr: str) -> list[tuple[Task, TaskFetch]]:
        """The tasks parked until build ``nvr`` is mirrored, and not yet woken."""
        query = (
            sa.select(tasks, *[c.label(f"fetch_{c.name}") for c in task_fetches.c])
            .join(task_fetches, task_fetches.c.task_id == tasks.c.id)
            .where(task_fetches.c.nvr == nvr, task_fetches.c.woken_by.is_(None))
            .order_by(task_fetches.c.parked_at)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        found = []
        for row in rows:
            fetch = {k.removeprefix("fetch_"): v for k, v in row.items() if k.startswith("fetch_")}
            task = {k: v for k, v in row.items() if not k.startswith("fetch_")}
            found.append((_task(task), TaskFetch(**fetch)))
        return found

    # -- passwords ------------------------------------------------------------

    def rotate_password(self, task_id: str, presented: str, following: str) -> bool:
        """Replace the password digest ``presented`` by ``following``, atomically.

        Only one of several concurrent rotations from the same password wins; the
        others see ``False`` and may then replay (:meth:`replay_password`).
        """
        with self._tx() as conn:
            result = conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.password_digest == presented)
                .values(
                    password_digest=following,
                    previous_digest=presented,
                    rotated_at=_utcnow(),
                    previous_replays=0,
                )
            )
        return result.rowcount == 1

    def replay_password(self, task_id: str, presented: str, since: datetime, times: int) -> bool:
        """Accept the previous password digest again, at most ``times`` times after a
        rotation at or after ``since``; whether it was accepted."""
        with self._tx() as conn:
            result = conn.execute(
                tasks.update()
                .where(
                    tasks.c.id == task_id,
                    tasks.c.previous_digest == presented,
                    tasks.c.rotated_at >= since,
                    tasks.c.previous_replays < times,
                )
                .values(previous_replays=tasks.c.previous_replays + 1)
            )
        return result.rowcount == 1

    def count_password_failure(self, task_id: str, client: str, window_start: datetime) -> int:
        """Count one wrong password of ``client`` for ``task_id``; return the failures in
        the current window (one that began before ``window_start`` starts afresh)."""
        now = _utcnow()
        insert = _dialect_insert(self.engine)
        table = password_failures
        stale = table.c.window_start < window_start
        # One upsert: concurrent workers queue on the row and never lose a count.
        statement = (
            insert(table)
            .values(task_id=task_id, client=client, window_start=now, failures=1)
            .on_conflict_do_update(
                index_elements=[table.c.task_id, table.c.client],
                set_={
                    "failures": sa.case((stale, 1), else_=table.c.failures + 1),
                    "window_start": sa.case((stale, now), else_=table.c.window_start),
                },
            )
        )
        with self._tx() as conn:
            conn.execute(statement)
            failures = conn.execute(
                sa.select(table.c.failures).where(
                    table.c.task_id == task_id, table.c.client == client
                )
            ).scalar_one()
        return int(failures)

    def password_failures_since(self, task_id: str, client: str, window_start: datetime) -> int:
        """Wrong passwords of ``client`` for ``task_id`` in the window begun after
        ``window_start``."""
        query = sa.select(password_failures.c.failures).where(
            password_failures.c.task_id == task_id,
            password_failures.c.client == client,
            password_failures.c.window_start >= window_start,
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def forget_password_failures(self, before: datetime) -> int:
        """Drop failure windows begun before ``before``; how many were dropped."""
        with self._tx() as conn:
            result = conn.execute(
                password_failures.delete().where(password_failures.c.window_start < before)
            )
        return result.rowcount

    # -- uploads in flight ----------------------------------------------------

    def begin_upload(self, upload_id: str, client: str, since: datetime) -> int:
        """Record an upload from ``client``; return how many of its uploads begun at or
        after ``since`` are in flight, this one included."""
        with self._tx() as conn:
            conn.execute(uploads.insert().values(id=upload_id, client=client, started_at=_utcnow()))
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        uploads.c.client == client, uploads.c.started_at >= since
                    )
                ).scalar_one()
            )

    def end_upload(self, upload_id: str) -> None:
        """Forget an upload that ended, however it ended."""
        with self._tx() as conn:
            conn.execute(uploads.delete().where(uploads.c.id == upload_id))

    def forget_uploads(self, before: datetime) -> int:
        """Drop records of uploads begun before ``before`` (their worker died)."""
        with self._tx() as conn:
            result = conn.execute(uploads.delete().where(uploads.c.started_at < before))
        return result.rowcount

    def begin_leased_upload(
        self,
        upload_id: str,
        client: str,
        task_id: str,
        holder: tuple[str, int],
        lease_since: datetime,
        since: datetime,
    ) -> int:
        """Record an upload from ``client`` into the spool folder ``task_id``, received by
        ``holder`` (host, pid), its lease renewed now.  Return how many of the client's
        uploads are in flight, this one included: those whose lease was renewed at or
        after ``lease_since``, and those without a lease begun at or after ``since``."""
        host, pid = holder
        now = _utcnow()
        with self._tx() as conn:
            conn.execute(
                uploads.insert().values(
                    id=upload_id,
                    client=client,
                    started_at=now,
                    task_id=task_id,
                    host=host,
                    pid=pid,
                    renewed_at=now,
                )
            )
            live = sa.or_(
                uploads.c.renewed_at >= lease_since,
                sa.and_(uploads.c.renewed_at.is_(None), uploads.c.started_at >= since),
            )
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(uploads.c.client == client, live)
                ).scalar_one()
            )

    def renew_uploads(self, holder: tuple[str, int]) -> int:
        """Renew the leases of every upload ``holder`` (host, pid) receives; how many."""
        host, pid = holder
        with self._tx() as conn:
            result = conn.execute(
                uploads.update()
                .where(uploads.c.host == host, uploads.c.pid == pid)
                .values(renewed_at=_utcnow())
            )
        return result.rowcount

    def uploads_to_release(
        self, expired_before: datetime, holder: tuple[str, int] | None = None
    ) -> list[tuple[str, str | None]]:
        """(upload id, spool folder) of the uploads whose lease was last renewed before
        ``expired_before``, or, with ``holder``, of every upload that holder received."""
        if holder is None:
            which = uploads.c.renewed_at < expired_before
        else:
            which = sa.and_(uploads.c.host == holder[0], uploads.c.pid == holder[1])
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(uploads.c.id, uploads.c.task_id).where(which)).all()
        return [(row.id, row.task_id) for row in rows]

    def release_upload(self, upload_id: str, expired_before: datetime | None = None) -> bool:
        """Forget an upload whose receiver is gone; with ``expired_before``, only if its
        lease is still older than that (its receiver did not renew it meanwhile)."""
        query = uploads.delete().where(uploads.c.id == upload_id)
        if expired_before is not None:
            query = query.where(uploads.c.renewed_at < expired_before)
        with self._tx() as conn:
            return conn.execute(query).rowcount > 0

    # -- packages and build-ids -----------------------------------------------

    def add_package(
        self,
        nevra: Nevra,
        os_release: str,
        path: str,
        sha256: str,
        size: int,
        entries: Sequence[IndexEntry],
        source_nvr: str | None = None,
        index_version: int = INDEX_VERSION,
        conflicts: int = 0,
    ) -> tuple[Package, bool]:
        """Record a package, the build it came from and its build-id entries.

        Idempotent: importing the same package again returns the existing row and
        ``False``; a different file under the same NEVRA and release is refused
        (:class:`PackageConflict`).
        """
        key = (
            packages.c.os_release == os_release,
            packages.c.name == nevra.name,
            packages.c.epoch == nevra.epoch,
            packages.c.version == nevra.version,
            packages.c.release == nevra.release,
            packages.c.arch == nevra.arch,
        )
        with self._tx() as conn:
            row = conn.execute(packages.select().where(*key)).mappings().first()
            if row is not None:
                if row["sha256"] != sha256:
                    raise PackageConflict(
                        f"{nevra} for {os_release} is already mirrored with a different "
                        f"content (sha256 {row['sha256']}, this file {sha256})"
                    )
                return _package(row), False
            inserted = conn.execute(
                packages.insert().values(
                    name=nevra.name,
                    epoch=nevra.epoch,
                    version=nevra.version,
                    release=nevra.release,
                    arch=nevra.arch,
                    os_release=os_release,
                    path=path,
                    sha256=sha256,
                    size=size,
                    added_at=_utcnow(),
                    source_nvr=source_nvr,
                    index_version=index_version,
                    index_conflicts=conflicts,
                )
            ).inserted_primary_key
            assert inserted is not None
            package_id = inserted[0]
            _insert_entries(conn, package_id, entries)
            added = conn.execute(packages.select().where(packages.c.id == package_id))
            return _package(added.mappings().one()), True

    def reindex_package(
        self,
        package_id: int,
        entries: Sequence[IndexEntry],
        source_nvr: str | None,
        index_version: int = INDEX_VERSION,
        conflicts: int = 0,
    ) -> bool:
        """Replace a package's build-id entries and record its build; ``False`` if it is gone.

        One transaction: a reader sees the old entries or the new ones, never a mix.
        """
        with self._tx() as conn:
            done = conn.execute(
                packages.update()
                .where(packages.c.id == package_id)
                .values(
                    source_nvr=source_nvr, index_version=index_version, index_conflicts=conflicts
                )
            )
            if done.rowcount == 0:
                return False
            conn.execute(build_ids.delete().where(build_ids.c.package_id == package_id))
            _insert_entries(conn, package_id, entries)
            return True

    def index_conflicts(self) -> int:
        """How many ``.build-id`` links of mirrored packages their ELF files contradicted."""
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.sum(packages.c.index_conflicts))).scalar()
        return int(total or 0)

    def reindex_backlog(self, index_version: int = INDEX_VERSION) -> int:
        """How many packages were indexed by an older way than ``index_version``."""
        query = sa.select(sa.func.count()).where(packages.c.index_version < index_version)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def packages_to_reindex(self, index_version: int = INDEX_VERSION) -> list[Package]:
        """Packages indexed by an older way than ``index_version``, oldest import first."""
        query = (
            packages.select()
            .where(packages.c.index_version < index_version)
            .order_by(packages.c.id)
        )
        with self.engine.connect() as conn:
            return [_package(row) for row in conn.execute(query).mappings().all()]

    def find_paths(
        self, paths: Iterable[str], kinds: Iterable[BuildIdKind] = (), arch: str | None = None
    ) -> list[BuildIdHit]:
        """Every indexed file at one of ``paths`` (of one of ``kinds``, in ``arch``)."""
        wanted = sorted(set(paths))
        if not wanted:
            return []
        query = (
            sa.select(
                packages,
                build_ids.c.build_id,
                build_ids.c.kind,
                build_ids.c.path.label("entry_path"),
            )
            .join(packages, packages.c.id == build_ids.c.package_id)
            .where(build_ids.c.path.in_(wanted))
            .order_by(packages.c.id)
        )
        kinds = list(kinds)
        if kinds:
            query = query.where(build_ids.c.kind.in_([str(k) for k in kinds]))
        if arch is not None:
            query = query.where(packages.c.arch.in_([arch, "noarch"]))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_hit(row) for row in rows]

    def build_of(self, source_nvr: str, arch: str) -> list[Package]:
        """The packages of build ``source_nvr`` for ``arch`` (and noarch), oldest import first."""
        query = (
            packages.select()
            .where(packages.c.source_nvr == source_nvr, packages.c.arch.in_([arch, "noarch"]))
            .order_by(packages.c.id)
        )
        with self.engine.connect() as conn:
            return [_package(row) for row in conn.execute(query).mappings().all()]

    def find_build_ids(self, wanted: Iterable[str]) -> list[BuildIdHit]:
        """Every package file that carries one of the ``wanted`` build-ids."""
        ids = sorted(set(wanted))
        if not ids:
            return []
        query = (
            sa.select(
                packages,
                build_ids.c.build_id,
                build_ids.c.kind,
                build_ids.c.path.label("entry_path"),
            )
            .join(packages, packages.c.id == build_ids.c.package_id)
            .where(build_ids.c.build_id.in_(ids))
            .order_by(build_ids.c.build_id, packages.c.id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_hit(row) for row in rows]

    def mirrored_releases(self) -> list[tuple[str, str]]:
        """Every ``(os_release, arch)`` the mirror has binary packages for, such as
        ``("fedora-40", "x86_64")`` (noarch and source packages name no architecture)."""
        query = (
            sa.select(packages.c.os_release, packages.c.arch)
            .where(packages.c.arch.not_in(["noarch", "src"]))
            .distinct()
            .order_by(packages.c.os_release, packages.c.arch)
        )
        with self.engine.connect() as conn:
            return [(release, arch) for release, arch in conn.execute(query)]

    def holds_build(
        self,
        name: str,
        version: str,
        release: str,
        arches: Iterable[str] | None = None,
        os_releases: Iterable[str] | None = None,
    ) -> bool:
        """Whether the mirror holds ``name-version-release`` for one of ``arches`` in one
        of ``os_releases`` (``None``: any).

        The NVR may name a package (a subpackage such as ``foo-cli``) or the build it
        comes from: a package whose source RPM is ``name-version-release`` counts.
        """
        nvr = f"{name}-{version}-{release}"
        query = sa.select(packages.c.id).where(
            sa.or_(
                sa.and_(
                    packages.c.name == name,
                    packages.c.version == version,
                    packages.c.release == release,
                ),
                packages.c.source_nvr == nvr,
            )
        )
        if arches is not None:
            query = query.where(packages.c.arch.in_(sorted(set(arches))))
        if os_releases is not None:
            query = query.where(packages.c.os_release.in_(sorted(set(os_releases))))
        with self.engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def find_packages(self, name: str, os_release: str, arch: str | None = None) -> list[Package]:
        """Every mirrored version of ``name`` for ``os_release``, newest import first."""
        query = packages.select().where(
            packages.c.name == name, packages.c.os_release == os_release
        )
        if arch is not None:
            query = query.where(packages.c.arch == arch)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(packages.c.id.desc())).mappings().all()
        return [_package(row) for row in rows]

    def find_package(self, nevra: Nevra, os_release: str) -> Package | None:
        """The mirrored package ``nevra`` for ``os_release``, if any."""
        query = packages.select().where(
            packages.c.os_release == os_release,
            packages.c.name == nevra.name,
            packages.c.epoch == nevra.epoch,
            packages.c.version == nevra.version,
            packages.c.release == nevra.release,
            packages.c.arch == nevra.arch,
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _package(row)

    def remove_package(self, package_id: int) -> None:
        """Forget a package with its build-id entries (its file is the caller's)."""
        with self._tx() as conn:
            conn.execute(build_ids.delete().where(build_ids.c.package_id == package_id))
            conn.execute(
                koji_build_packages.delete().where(koji_build_packages.c.package_id == package_id)
            )
            conn.execute(packages.delete().where(packages.c.id == package_id))

    def all_packages(self, os_release: str | None = None) -> list[Package]:
        """Every mirrored package (of ``os_release``), oldest import first."""
        query = packages.select().order_by(packages.c.id)
        if os_release is not None:
            query = query.where(packages.c.os_release == os_release)
        with self.engine.connect() as conn:
            return [_package(row) for row in conn.execute(query).mappings().all()]

    # -- Koji builds (the mirror) ---------------------------------------------

    def record_build(
        self,
        build_id: int,
        nvr: str,
        os_release: str | None,
        state: SyncState,
        reason: str | None = None,
        completed_at: datetime | None = None,
        package_ids: Iterable[int] = (),
    ) -> None:
        """Record what the mirror did with Koji build ``build_id``; safe to repeat."""
        values = {
            "nvr": nvr,
            "os_release": os_release,
            "state": state,
            "reason": reason,
            "completed_at": completed_at,
            "synced_at": _utcnow(),
        }
        with self._tx() as conn:
            done = conn.execute(
                koji_builds.update().where(koji_builds.c.id == build_id).values(**values)
            )
            if done.rowcount == 0:
                conn.execute(koji_builds.insert().values(id=build_id, **values))
            have = set(
                conn.execute(
                    sa.select(koji_build_packages.c.package_id).where(
                        koji_build_packages.c.build_id == build_id
                    )
                ).scalars()
            )
            new = sorted(set(package_ids) - have)
            if new:
                conn.execute(
                    koji_build_packages.insert(),
                    [{"build_id": build_id, "package_id": p} for p in new],
                )

    def get_build(self, build_id: int) -> KojiBuild | None:
        """What the mirror did with Koji build ``build_id``, if it ever saw it."""
        return self._one_build(koji_builds.c.id == build_id)

    def find_build(self, nvr: str) -> KojiBuild | None:
        """What the mirror did with the Koji build named ``nvr``, if it ever saw it."""
        return self._one_build(koji_builds.c.nvr == nvr)

    def _one_build(self, where: sa.ColumnElement[bool]) -> KojiBuild | None:
        with self.engine.connect() as conn:
            row = conn.execute(koji_builds.select().where(where)).mappings().first()
        return None if row is None else KojiBuild(**{**row, "state": SyncState(row["state"])})

    def build_packages(self, build_id: int) -> list[Package]:
        """The mirrored packages that Koji build ``build_id`` brought."""
        query = (
            packages.select()
            .join(koji_build_packages, koji_build_packages.c.package_id == packages.c.id)
            .where(koji_build_packages.c.build_id == build_id)
            .order_by(packages.c.id)
        )
        with self.engine.connect() as conn:
            return [_package(row) for row in conn.execute(query).mappings().all()]

    def get_cursor(self, name: str) -> datetime | None:
        """The saved position ``name`` (e.g. the last Koji completion time seen)."""
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(mirror_cursors.c.value).where(mirror_cursors.c.name == name)
            ).scalar()
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)  # SQLite forgets the zone; we store UTC
        return value

    def set_cursor(self, name: str, value: datetime) -> None:
        """Save the position ``name``."""
        with self._tx() as conn:
            done = conn.execute(
                mirror_cursors.update().where(mirror_cursors.c.name == name).values(value=value)
            )
            if done.rowcount == 0:
                conn.execute(mirror_cursors.insert().values(name=name, value=value))


def _dialect_insert(engine: Engine) -> Any:
    # Both dialects spell an upsert the same way, from their own module.
    if engine.dialect.name == "postgresql":
        return sa.dialects.postgresql.insert
    return sa.dialects.sqlite.insert


def _task(row: Any) -> Task:
    return Task(**{**row, "status": TaskStatus(row["status"])})


def _hit(row: Any) -> BuildIdHit:
    return BuildIdHit(
        build_id=row["build_id"],
        kind=BuildIdKind(row["kind"]),
        path=row["entry_path"],
        package=_package(row),
    )


def _insert_entries(conn: Connection, package_id: int, entries: Sequence[IndexEntry]) -> None:
    # One row per (build-id, path): an ELF note and a header link may both name a file.
    unique: dict[tuple[str, str], IndexEntry] = {}
    for entry in entries:
        if entry.source == IndexSource.ELF or (entry.build_id, entry.path) not in unique:
            unique[entry.build_id, entry.path] = entry
    if unique:
        conn.execute(
            build_ids.insert(),
            [
                {
                    "build_id": e.build_id,
                    "package_id": package_id,
                    "kind": str(e.kind),
                    "path": e.path,
                    "source": str(e.source),
                }
                for _, e in sorted(unique.items())
            ],
        )


def _package(row: Any) -> Package:
    return Package(
        id=row["id"],
        nevra=Nevra(row["name"], row["epoch"], row["version"], row["release"], row["arch"]),
        os_release=row["os_release"],
        path=row["path"],
        sha256=row["sha256"],
        size=row["size"],
        source_nvr=row["source_nvr"],
    )
