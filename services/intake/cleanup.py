"""``retrace-intake cleanup``: retention, stuck submissions and leftovers.

Safe to run from a timer while requests arrive: every removal is a guarded delete
of the row first (only if the task is still in the state that made it expire),
then of its files; an upload in progress is never mistaken for a leftover, because
its folder is younger than the longest an upload may take.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from schemas.messages import AnalyzeTaskV1, TaskType
from schemas.topology import ANALYZE
from services.common.bus import Publish, PublishError
from services.common.data.intake import IntakeData, TaskStatus
from services.common.settings import IntakeSettings
from services.common.spool import Spool
from services.intake.leases import sweep_expired

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What one cleanup run did."""

    expired: list[str] = field(default_factory=list)
    debug_cores_removed: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    released_uploads: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log and the terminal."""
        return (
            f"expired {len(self.expired)}, debug cores removed "
            f"{len(self.debug_cores_removed)}, republished {len(self.republished)}, "
            f"abandoned {len(self.abandoned)}, leftover folders {len(self.leftovers)}, "
            f"dead workers' uploads {len(self.released_uploads)}"
        )


class Cleanup:
    """One pass over the store and the spool."""

    def __init__(
        self, settings: IntakeSettings, data: IntakeData, spool: Spool, publish: Publish
    ) -> None:
        self._settings = settings
        self._data = data
        self._spool = spool
        self._publish = publish

    def run(self) -> Report:
        """Do everything once; return what was done."""
        report = Report()
        now = datetime.now(UTC)
        keep = {
            TaskStatus.SUCCESS: timedelta(hours=self._settings.keep_success_hours),
            TaskStatus.FAILURE: timedelta(hours=self._settings.keep_failure_hours),
        }
        for status, hours in keep.items():
            for task in self._data.tasks_older_than(status, now - hours):
                if self._data.delete_task_if(task.id, status):
                    self._spool.remove(task.id)
                    report.expired.append(task.id)
        debug_until = now - timedelta(hours=self._settings.keep_debug_hours)
        for status in keep:
            for task in self._data.tasks_older_than(status, debug_until):
                crash = self._spool.crash_dir(task.id)
                if task.task_type == TaskType.DEBUG and crash.exists():
                    shutil.rmtree(crash, ignore_errors=True)
                    report.debug_cores_removed.append(task.id)
        self._stuck(now, report)
        # Uploads whose intake worker died (its lease expired): their rows and folders.
        report.released_uploads = sweep_expired(self._data, self._spool)
        self._leftovers(report)
        self._data.forget_password_failures(
            now - timedelta(seconds=self._settings.wrong_password_window_seconds)
        )
        self._data.forget_uploads(now - timedelta(seconds=self._settings.upload_timeout_seconds))
        log.info("cleanup: %s", report.summary())
        return report

    def _stuck(self, now: datetime, report: Report) -> None:
        # A task stays submitting only if its intake died between recording it and
        # queueing it: its files are complete (the row is written after them).
        since = now - timedelta(seconds=self._settings.submitting_timeout_seconds)
        for task in self._data.tasks_older_than(TaskStatus.SUBMITTING, since):
            if not (self._spool.crash_dir(task.id) / "coredump").exists():
                if self._data.delete_task_if(task.id, TaskStatus.SUBMITTING):
                    self._spool.remove(task.id)
                    report.abandoned.append(task.id)
                continue
            command = AnalyzeTaskV1(
                task_id=task.id, arch=task.arch, task_type=TaskType(task.task_type)
            )
            try:
                self._publish(ANALYZE, command, task.arch)
            except PublishError as exc:
                log.warning("cleanup: task %s still not queued: %s", task.id, exc)
                continue
            if self._data.move_task(task.id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED):
                report.republished.append(task.id)

    def _leftovers(self, report: Report) -> None:
        if not self._spool.root.exists():
            return
        # Older than any upload may take, with room for a slow filesystem.
        age = self._settings.upload_timeout_seconds + self._settings.submitting_timeout_seconds
        cutoff = time.time() - age
        for folder in self._spool.root.iterdir():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                if folder.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            if self._data.get_task(folder.name) is None:
                self._spool.remove(folder.name)
                report.leftovers.append(folder.name)
