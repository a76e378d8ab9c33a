"""The dead-letter consumer: analyze commands the broker gave up on fail their tasks.

A command lands here when the command queue's policy dead-letters it: after the
delivery limit (its analyzers kept dying or failing on it) or at once when an
analyzer rejected it as unreadable.  The task is marked failed with the reason
taken from the ``x-death`` header, so the user reads why instead of waiting.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.messages import TASK_ID_PATTERN, AnalyzeTaskV1, Outcome, TaskFinishedV1, parse
from services.analyzer.results import announce_finished
from services.analyzer.tasklog import TaskLog
from services.analyzer.worker import MAX_LEASE_WAITS, park_for_lease
from services.common import progress
from services.common.bus import Later, Publish
from services.common.bus import death_reason as bus_death_reason
from services.common.data.db import aware
from services.common.data.intake import IntakeData, Task, TaskStatus
from services.common.spool import LOG, Spool

log = logging.getLogger(__name__)

_TASK_ID = re.compile(TASK_ID_PATTERN)

_WHY = {
    "delivery_limit": "the analysis was given up after it failed or its analyzer stopped on "
    "every attempt",
    "rejected": "the analyze command was refused as unreadable",
    "expired": "the analyze command expired before an analyzer took it",
    "maxlen": "the analyze queue was full",
}


def death_reason(headers: dict[str, Any]) -> str:
    """One plain sentence from a dead-lettered analyze command's ``x-death`` header."""
    return bus_death_reason(headers, _WHY, "the broker dead-lettered the analyze command")


def _command_of(body: bytes) -> AnalyzeTaskV1 | None:
    try:
        return parse(AnalyzeTaskV1, body)
    except ValueError:
        return None


def task_id_of(body: bytes) -> str | None:
    """The task a dead-lettered body names, if it names one well enough to trust."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    task_id = data.get("task_id") if isinstance(data, dict) else None
    return task_id if isinstance(task_id, str) and _TASK_ID.match(task_id) else None


class DeadLetterHandler:
    """Marks the task of one dead-lettered command failed, with its results and event."""

    def __init__(
        self,
        tasks: IntakeData,
        spool: Spool,
        publish: Publish,
        later: Later | None = None,
        lease_seconds: int = 30,
    ) -> None:
        self._tasks = tasks
        self._spool = spool
        self._publish = publish
        self._later = later
        self._lease_seconds = lease_seconds

    def __call__(self, body: bytes, headers: dict[str, Any]) -> None:
        reason = death_reason(headers)
        task_id = task_id_of(body)
        if task_id is None:
            log.error("dropping a dead-lettered analyze command that names no task: %s", reason)
            return
        task = self._tasks.get_task(task_id)
        if task is None or task.status.final:
            log.info("dead-lettered task %s is finished, deleted or unknown", task_id)
            return
        if self._returned_by_lost_connections(body, headers, task):
            return
        tasklog = TaskLog(task_id)
        tasklog.add(f"Retrace failed: {reason}")
        # A task refused before its upload was spooled has no folder yet.
        self._spool.task_dir(task_id).mkdir(parents=True, exist_ok=True)
        # Results before state, as the analyzer's own (services.analyzer.worker).
        folder = self._spool.write_results(task_id, {LOG: tasklog.text()})
        allowed = [TaskStatus.SUBMITTING, TaskStatus.QUEUED, TaskStatus.RUNNING]
        if not self._tasks.move_task(
            task_id,
            allowed,
            TaskStatus.FAILURE,
            progress=progress.FAIL,
            reason=reason,
            results=folder,
        ):
            self._spool.drop_result(task_id, folder)
            return
        self._spool.drop_results(task_id, keep=folder)
        event = TaskFinishedV1(
            task_id=task_id, arch=task.arch, outcome=Outcome.FAILURE, reason=reason
        )
        announce_finished(self._publish, event, self._spool, task.task_type)
        log.info("dead-lettered task %s failed: %s", task_id, reason)

    def _returned_by_lost_connections(
        self, body: bytes, headers: dict[str, Any], task: Task
    ) -> bool:
        """Whether the broker gave up on a command that only lost connections returned.

        RabbitMQ counts a delivery returned because its connection closed toward the
        delivery limit, as it counts a failure.  A task a live analyzer still holds
        (its lease is fresh) has not failed: the command waits a lease's life and
        comes back, at most :data:`MAX_LEASE_WAITS` times.  Returns whether it waits.
        """
        if self._later is None or headers.get("x-first-death-reason") != "delivery_limit":
            return False
        command = _command_of(body)
        fresh_after = datetime.now(UTC) - timedelta(seconds=self._lease_seconds)
        if (
            command is None
            or command.lease_waits >= MAX_LEASE_WAITS
            or task.status != TaskStatus.RUNNING
            or task.lease_at is None
            or aware(task.lease_at) <= fresh_after
        ):
            return False
        park_for_lease(self._later, command, self._lease_seconds)
        log.warning(
            "the broker gave up on task %s's command after lost connections while %s "
            "works on it; the command waits %d s instead of failing the task",
            task.id,
            task.lease_owner,
            self._lease_seconds,
        )
        return True
