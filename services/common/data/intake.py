"""The intake's data: tasks, wrong-password windows and uploads in flight.

Only this module names these tables.  The analyzer moves tasks through their states
with the same functions (:meth:`IntakeData.move_task`, :meth:`IntakeData.get_task`,
the lease functions); a function that takes ``conn`` runs inside the caller's
transaction when one is given, so another owner may change its own rows and a task
at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.data.db import Database, aware, utcnow

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
    # finished the task, once its files were on disk.
    sa.Column("results", sa.String(64)),
    # The analyzer working on a running task ("host:pid") and when it last said so.
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
    # The upload's lease: the spool folder it fills, the intake worker receiving it
    # (host, pid) and when that worker last said it still was.
    sa.Column("task_id", sa.String(64)),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("renewed_at", sa.DateTime(timezone=True)),
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
    ``results`` of a task finished before it was recorded)."""
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


def _task(row: Any) -> Task:
    return Task(**{**row, "status": TaskStatus(row["status"])})


class IntakeData:
    """The intake's tables; every method is one short transaction unless given ``conn``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- tasks ----------------------------------------------------------------

    def create_task(
        self, task_id: str, password_digest: str, arch: str, task_type: str, progress: str
    ) -> None:
        """Record a new task in the ``submitting`` state."""
        with self.db.begin() as conn:
            conn.execute(
                tasks.insert().values(
                    id=task_id,
                    password_digest=password_digest,
                    status=TaskStatus.SUBMITTING,
                    task_type=task_type,
                    arch=arch,
                    progress=progress,
                    created_at=utcnow(),
                )
            )

    def get_task(self, task_id: str, conn: Connection | None = None) -> Task | None:
        """The task ``task_id``, or ``None`` if there is none."""
        with self.db.connect(conn) as c:
            row = c.execute(tasks.select().where(tasks.c.id == task_id)).mappings().first()
        return None if row is None else _task(row)

    def move_task(
        self,
        task_id: str,
        allowed_from: Iterable[TaskStatus],
        to: TaskStatus,
        *,
        conn: Connection | None = None,
        **fields: Any,
    ) -> bool:
        """Move a task to ``to`` only if it is in one of ``allowed_from``.

        This guarded update is how two deliveries of the same command, or a late
        one, end with exactly one result: only the first mover wins.
        """
        values: dict[str, Any] = {"status": to, **fields}
        if to == TaskStatus.RUNNING:
            values.setdefault("started_at", utcnow())
        if to.final:
            values.setdefault("finished_at", utcnow())
        with self.db.begin(conn) as c:
            result = c.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status.in_(list(allowed_from)))
                .values(**values)
            )
        return result.rowcount == 1

    def renew_lease(self, task_id: str, owner: str) -> bool:
        """Say again that ``owner`` works on running task ``task_id``; whether it still does."""
        with self.db.begin() as conn:
            done = conn.execute(
                tasks.update()
                .where(
                    tasks.c.id == task_id,
                    tasks.c.status == TaskStatus.RUNNING,
                    tasks.c.lease_owner == owner,
                )
                .values(lease_at=utcnow())
            )
        return done.rowcount == 1

    def release_lease(self, task_id: str, owner: str) -> None:
        """``owner`` no longer works on ``task_id`` (it finished, failed or gave it back)."""
        with self.db.begin() as conn:
            conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.lease_owner == owner)
                .values(lease_owner=None, lease_at=None)
            )

    def requeue_task(self, task_id: str, progress: str, conn: Connection | None = None) -> bool:
        """Put a running task back to ``queued`` for a retry later; whether it was running."""
        return self.move_task(
            task_id, [TaskStatus.RUNNING], TaskStatus.QUEUED, conn=conn, progress=progress
        )

    def set_progress(self, task_id: str, progress: str) -> None:
        """Record the one-line progress shown by ``GET /<id>``."""
        with self.db.begin() as conn:
            conn.execute(tasks.update().where(tasks.c.id == task_id).values(progress=progress))

    def delete_task(self, task_id: str) -> None:
        """Forget a task (the database forgets what other owners keep about it)."""
        with self.db.begin() as conn:
            conn.execute(tasks.delete().where(tasks.c.id == task_id))

    def count_tasks(self, statuses: Iterable[TaskStatus]) -> int:
        """How many tasks are in one of ``statuses``."""
        query = sa.select(sa.func.count()).where(tasks.c.status.in_(list(statuses)))
        with self.db.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def count_tasks_by_status(self) -> dict[TaskStatus, int]:
        """The number of tasks in each state (every state present, zero included)."""
        query = sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)
        counts = dict.fromkeys(TaskStatus, 0)
        with self.db.connect() as conn:
            for status, count in conn.execute(query):
                counts[TaskStatus(status)] = int(count)
        return counts

    def tasks_older_than(self, status: TaskStatus, before: datetime) -> list[Task]:
        """Tasks in ``status`` created (or, for final states, finished) before ``before``."""
        column = tasks.c.finished_at if status.final else tasks.c.created_at
        query = tasks.select().where(tasks.c.status == status, column < before)
        with self.db.connect() as conn:
            return [_task(row) for row in conn.execute(query).mappings()]

    def delete_task_if(self, task_id: str, status: TaskStatus) -> bool:
        """Forget a task only if it is still in ``status``; whether it was deleted."""
        with self.db.begin() as conn:
            result = conn.execute(
                tasks.delete().where(tasks.c.id == task_id, tasks.c.status == status)
            )
        return result.rowcount == 1

    # -- passwords ------------------------------------------------------------

    def rotate_password(self, task_id: str, presented: str, following: str) -> bool:
        """Replace the password digest ``presented`` by ``following``, atomically.

        Only one of several concurrent rotations from the same password wins; the
        others see ``False`` and may then replay (:meth:`replay_password`).
        """
        with self.db.begin() as conn:
            result = conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.password_digest == presented)
                .values(
                    password_digest=following,
                    previous_digest=presented,
                    rotated_at=utcnow(),
                    previous_replays=0,
                )
            )
        return result.rowcount == 1

    def replay_password(self, task_id: str, presented: str, since: datetime, times: int) -> bool:
        """Accept the previous password digest again, at most ``times`` times after a
        rotation at or after ``since``; whether it was accepted."""
        with self.db.begin() as conn:
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
        now = utcnow()
        insert = self.db.dialect_insert()
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
        with self.db.begin() as conn:
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
        with self.db.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def forget_password_failures(self, before: datetime) -> int:
        """Drop failure windows begun before ``before``; how many were dropped."""
        with self.db.begin() as conn:
            result = conn.execute(
                password_failures.delete().where(password_failures.c.window_start < before)
            )
        return result.rowcount

    # -- uploads in flight ----------------------------------------------------

    def begin_upload(self, upload_id: str, client: str, since: datetime) -> int:
        """Record an upload from ``client``; return how many of its uploads begun at or
        after ``since`` are in flight, this one included."""
        with self.db.begin() as conn:
            conn.execute(uploads.insert().values(id=upload_id, client=client, started_at=utcnow()))
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        uploads.c.client == client, uploads.c.started_at >= since
                    )
                ).scalar_one()
            )

    def end_upload(self, upload_id: str) -> None:
        """Forget an upload that ended, however it ended."""
        with self.db.begin() as conn:
            conn.execute(uploads.delete().where(uploads.c.id == upload_id))

    def forget_uploads(self, before: datetime) -> int:
        """Drop records of uploads begun before ``before`` (their worker died)."""
        with self.db.begin() as conn:
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
        now = utcnow()
        with self.db.begin() as conn:
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
        with self.db.begin() as conn:
            result = conn.execute(
                uploads.update()
                .where(uploads.c.host == host, uploads.c.pid == pid)
                .values(renewed_at=utcnow())
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
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(uploads.c.id, uploads.c.task_id).where(which)).all()
        return [(row.id, row.task_id) for row in rows]

    def release_upload(self, upload_id: str, expired_before: datetime | None = None) -> bool:
        """Forget an upload whose receiver is gone; with ``expired_before``, only if its
        lease is still older than that (its receiver did not renew it meanwhile)."""
        query = uploads.delete().where(uploads.c.id == upload_id)
        if expired_before is not None:
            query = query.where(uploads.c.renewed_at < expired_before)
        with self.db.begin() as conn:
            return conn.execute(query).rowcount > 0
