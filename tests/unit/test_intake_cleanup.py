"""``retrace-intake cleanup``: retention, stuck submissions, leftovers, while uploads arrive.

The command itself runs against the real broker in tests/integration/test_intake_http.py.
"""

# The shared fixtures are imported from test_intake.py, and pytest passes them by name.
# ruff: noqa: F811

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from schemas.messages import AnalyzeTaskV1, TaskType
from services.common.data.intake import TaskStatus, tasks
from services.intake.cleanup import Cleanup
from tests.unit.test_intake import (
    XZ,
    Intake,
    MakeIntake,
    archive,
    crash_files,
    intake,  # noqa: F401 -- a fixture
    make_intake,  # noqa: F401 -- a fixture
)


def cleanup(intake: Intake) -> Cleanup:
    return Cleanup(intake.settings.intake, intake.store.intake, intake.spool, intake.publisher)


def create(intake: Intake, task_type: str = "0") -> str:
    answer = intake.client.simulate_post(
        "/create",
        body=archive(crash_files()),
        headers={"Content-Type": XZ, "X-Task-Type": task_type},
    )
    assert answer.status_code == 201
    return answer.headers["X-Task-Id"]


def finish(intake: Intake, task_id: str, status: TaskStatus, hours_ago: float) -> None:
    assert intake.store.intake.move_task(task_id, [TaskStatus.QUEUED], TaskStatus.RUNNING)
    assert intake.store.intake.move_task(task_id, [TaskStatus.RUNNING], status)
    age(intake, task_id, finished_at=datetime.now(UTC) - timedelta(hours=hours_ago))


def age(intake: Intake, task_id: str, **values: object) -> None:
    with intake.store.engine.begin() as conn:
        conn.execute(sa.update(tasks).where(tasks.c.id == task_id).values(**values))


def test_finished_tasks_expire_after_their_own_hours(make_intake: MakeIntake) -> None:
    intake = make_intake(keep_success_hours=24, keep_failure_hours=2)
    old_success, new_success = create(intake), create(intake)
    old_failure, new_failure = create(intake), create(intake)
    finish(intake, old_success, TaskStatus.SUCCESS, 25)
    finish(intake, new_success, TaskStatus.SUCCESS, 3)
    finish(intake, old_failure, TaskStatus.FAILURE, 3)
    finish(intake, new_failure, TaskStatus.FAILURE, 1)
    pending = create(intake)
    age(intake, pending, created_at=datetime.now(UTC) - timedelta(days=30))
    report = cleanup(intake).run()
    assert sorted(report.expired) == sorted([old_success, old_failure])
    for gone in (old_success, old_failure):
        assert intake.store.intake.get_task(gone) is None
        assert not intake.spool.task_dir(gone).exists()
    for kept in (new_success, new_failure, pending):
        assert intake.store.intake.get_task(kept) is not None
        assert intake.spool.task_dir(kept).exists()


def test_a_debug_tasks_core_is_kept_for_its_own_hours(make_intake: MakeIntake) -> None:
    intake = make_intake(keep_debug_hours=1, keep_success_hours=100)
    debug = create(intake, "1")
    finish(intake, debug, TaskStatus.SUCCESS, 2)
    report = cleanup(intake).run()
    assert report.debug_cores_removed == [debug]
    assert not intake.spool.crash_dir(debug).exists()
    assert intake.store.intake.get_task(debug) is not None


def test_a_task_stuck_in_submitting_is_published_again_or_removed(
    make_intake: MakeIntake,
) -> None:
    intake = make_intake(submitting_timeout_seconds=60)
    stuck, lost, young = create(intake, "1"), create(intake), create(intake)
    intake.publisher.sent.clear()
    for task_id in (stuck, lost, young):
        age(intake, task_id, status=TaskStatus.SUBMITTING)
    for task_id in (stuck, lost):
        age(intake, task_id, created_at=datetime.now(UTC) - timedelta(minutes=5))
    (intake.spool.crash_dir(lost) / "coredump").unlink()
    report = cleanup(intake).run()
    assert report.republished == [stuck]
    assert report.abandoned == [lost]
    [(_, message, arch)] = intake.publisher.sent
    assert message == AnalyzeTaskV1(
        task_id=stuck,
        arch="x86_64",
        task_type=TaskType.DEBUG,
        submitted_at=message.submitted_at,  # type: ignore[attr-defined]
    )
    assert arch == "x86_64"
    task = intake.store.intake.get_task(stuck)
    assert task is not None
    assert task.status == TaskStatus.QUEUED
    assert intake.store.intake.get_task(lost) is None
    young_task = intake.store.intake.get_task(young)
    assert young_task is not None
    assert young_task.status == TaskStatus.SUBMITTING


def test_a_stuck_task_stays_when_the_broker_is_still_down(make_intake: MakeIntake) -> None:
    intake = make_intake(submitting_timeout_seconds=60)
    stuck = create(intake)
    age(
        intake,
        stuck,
        status=TaskStatus.SUBMITTING,
        created_at=datetime.now(UTC) - timedelta(minutes=5),
    )
    intake.publisher.fail = True
    assert cleanup(intake).run().republished == []
    task = intake.store.intake.get_task(stuck)
    assert task is not None
    assert task.status == TaskStatus.SUBMITTING


def test_leftover_folders_go_but_an_upload_in_progress_stays(make_intake: MakeIntake) -> None:
    intake = make_intake(upload_timeout_seconds=60, submitting_timeout_seconds=60)
    live = create(intake)
    dead = intake.spool.create("leftover-of-a-dead-worker")
    arriving = intake.spool.create("upload-arriving-now")
    old = time.time() - 3600
    os.utime(dead.parent, (old, old))
    os.utime(intake.spool.task_dir(live), (old, old))
    report = cleanup(intake).run()
    assert report.leftovers == ["leftover-of-a-dead-worker"]
    assert arriving.exists()
    assert intake.spool.task_dir(live).exists()
    assert (intake.spool.root / ".password-key").exists()
