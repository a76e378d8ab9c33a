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
import shutil
from typing import Any

from schemas.messages import Outcome, TaskFinishedV1
from services.analyzer.results import announce_finished
from services.analyzer.tasklog import TaskLog
from services.common import progress
from services.common.bus import Publish
from services.common.bus import death_reason as bus_death_reason
from services.common.spool import LOG, Spool
from services.common.store import Store, TaskStatus

log = logging.getLogger(__name__)

_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

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

    def __init__(self, store: Store, spool: Spool, publish: Publish) -> None:
        self._store = store
        self._spool = spool
        self._publish = publish

    def __call__(self, body: bytes, headers: dict[str, Any]) -> None:
        reason = death_reason(headers)
        task_id = task_id_of(body)
        if task_id is None:
            log.error("dropping a dead-lettered analyze command that names no task: %s", reason)
            return
        task = self._store.get_task(task_id)
        if task is None or task.status.final:
            log.info("dead-lettered task %s is finished, deleted or unknown", task_id)
            return
        tasklog = TaskLog(task_id)
        tasklog.add(f"Retrace failed: {reason}")
        # A task refused before its upload was spooled has no folder yet.
        self._spool.task_dir(task_id).mkdir(parents=True, exist_ok=True)
        staged = self._spool.stage_results(task_id, {LOG: tasklog.text()})
        allowed = [TaskStatus.SUBMITTING, TaskStatus.QUEUED, TaskStatus.RUNNING]
        if not self._store.move_task(
            task_id, allowed, TaskStatus.FAILURE, progress=progress.FAIL, reason=reason
        ):
            shutil.rmtree(staged, ignore_errors=True)
            return
        self._spool.commit_results(task_id, staged)
        event = TaskFinishedV1(
            task_id=task_id, arch=task.arch, outcome=Outcome.FAILURE, reason=reason
        )
        announce_finished(self._publish, event, self._spool, task.task_type)
        log.info("dead-lettered task %s failed: %s", task_id, reason)
