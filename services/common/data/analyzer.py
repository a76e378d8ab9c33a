"""The analyzer's data: tasks waiting for the mirror to fetch their crashed build.

Only this module names ``task_fetches``.  Parking, waking and requeueing a task
change a fetch and the intake's task row in one transaction, through the intake's
own functions (:class:`~services.common.data.intake.IntakeData`).

``task_fetches.task_id`` refers to the intake's ``tasks.id`` (ON DELETE CASCADE, see
the branch's first revision): a task the intake forgets takes its fetch with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from services.common.data.db import Database, utcnow
from services.common.data.intake import IntakeData, Task

metadata = sa.MetaData()

# Tasks waiting for the mirror to fetch their crashed build: how many times each
# asked, and which copy of its command woke it (a message id).  The foreign key to
# tasks.id lives in the migrations only: this metadata holds no other owner's table.
task_fetches = sa.Table(
    "task_fetches",
    metadata,
    sa.Column("task_id", sa.String(64), primary_key=True),
    sa.Column("nvr", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("woken_by", sa.String(64)),
    sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
)


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


class AnalyzerData:
    """The analyzer's table, and the task moves that go with it."""

    def __init__(self, db: Database, intake: IntakeData) -> None:
        self.db = db
        self._intake = intake

    def task_fetch(self, task_id: str) -> TaskFetch | None:
        """Whether, for which build and how often task ``task_id`` asked the mirror."""
        query = task_fetches.select().where(task_fetches.c.task_id == task_id)
        with self.db.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else TaskFetch(**row)

    def park_task(self, task_id: str, nvr: str, attempt: int, progress: str) -> bool:
        """Record the ``attempt``-th request of a running task for build ``nvr`` and
        move the task back to ``queued``, in one transaction.

        Guarded: nothing changes (``False``) unless the task is running and its
        previous request was the ``attempt - 1``-th, so of two copies of one command
        only one parks the task.
        """
        now = utcnow()
        try:
            with self.db.begin() as conn:
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
                if not self._intake.requeue_task(task_id, progress, conn=conn):
                    raise _Superseded
        except (_Superseded, sa.exc.IntegrityError):
            return False
        return True

    def requeue_task(self, task_id: str, progress: str) -> bool:
        """Put a running task back to ``queued`` for a retry later; whether it was running.

        A task that once waited for its build is made wakeable again, so that the
        retry's own copy of its command may run it (see :meth:`wake_task`).
        """
        with self.db.begin() as conn:
            if not self._intake.requeue_task(task_id, progress, conn=conn):
                return False
            conn.execute(
                task_fetches.update().where(task_fetches.c.task_id == task_id).values(woken_by=None)
            )
        return True

    def wake_task(self, task_id: str, attempt: int, token: str) -> bool:
        """Let the copy ``token`` of a parked task's command run it; whether it may.

        The first copy of the ``attempt``-th wait to get here wins (the build-synced
        republish or the wait queue's own copy); the other finds the task woken and
        does nothing.  A redelivery of the winner (same ``token``) wins again.
        """
        with self.db.begin() as conn:
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
            task_fetches.select()
            .where(task_fetches.c.nvr == nvr, task_fetches.c.woken_by.is_(None))
            .order_by(task_fetches.c.parked_at)
        )
        found = []
        with self.db.connect() as conn:
            for row in conn.execute(query).mappings().all():
                task = self._intake.get_task(row["task_id"], conn=conn)
                if task is not None:
                    found.append((task, TaskFetch(**row)))
        return found
