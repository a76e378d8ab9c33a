"""A crash of a build the mirror lacks: ask the mirror for it, wait on the broker, retry.

When the retrace finds that the crashed package's own build is not mirrored
(:class:`~services.analyzer.retrace.WaitForBuild`), the task is *parked*: the store
records which build it waits for and how often it asked, the task goes back to
``queued``, the mirror gets its command (by NVR), and a copy of the analyze command
waits in ``retrace.analyze.<arch>.wait.<n>s`` until its TTL sends it back to the
analyze queue.  If the mirror's build-synced event comes first, the task's command
is republished from the store at once.  Of those two copies only the first to
reach an analyzer runs the task (:meth:`AnalyzerData.wake_task`); the other does nothing.
After ``fetch_attempts`` requests the retrace goes on with what the mirror has.
"""

from __future__ import annotations

import logging
import uuid

import sqlalchemy.exc

from schemas.messages import AnalyzeTaskV1, BuildSyncedV1, MirrorAction, MirrorBuildV1, TaskType
from schemas.topology import ANALYZE, ANALYZE_WAIT, MIRROR_BUILD
from services.common.bus import Delivery, Later, Publish, PublishError
from services.common.data.analyzer import AnalyzerData
from services.common.settings import AnalyzerSettings

log = logging.getLogger(__name__)


def waiting_progress(nvr: str, attempt: int, limit: int, seconds: int) -> str:
    """The progress line of a task waiting for the mirror."""
    return (
        f"Downloading remote resources: waiting for the mirror to fetch {nvr} "
        f"(request {attempt} of {limit}, retry in {seconds} s)"
    )


class Fetches:
    """The store's and the broker's side of tasks that wait for their crashed build."""

    def __init__(
        self, settings: AnalyzerSettings, data: AnalyzerData, publish: Publish, later: Later
    ) -> None:
        self._settings = settings
        self._data = data
        self._publish = publish
        self._later = later

    def admit(self, delivery: Delivery) -> bool:
        """Whether this copy of an analyze command may run its task.

        A task that never waited admits every copy.  A parked task admits the first
        copy of its last wait to arrive (and that copy's redeliveries); older
        copies are stale.
        """
        command = delivery.message
        assert isinstance(command, AnalyzeTaskV1)
        task_id, sent = command.task_id, command.fetch_attempt
        fetch = self._data.task_fetch(task_id)
        if fetch is None:
            return True
        if sent == fetch.attempts:
            token = delivery.message_id or uuid.uuid4().hex
            if self._data.wake_task(task_id, sent, token):
                return True
            log.info(
                "task %s: another copy of its command already woke it after request %d; "
                "this copy does nothing",
                task_id,
                sent,
            )
            return False
        if sent == fetch.attempts - 1 and fetch.woken_by is None and delivery.redelivered:
            # The analyzer that parked the task may have died before the copy that
            # wakes it was sent: send it again (a second copy does nothing).
            log.warning("task %s: parked, but its wait may be lost; parking it again", task_id)
            self._send(command, fetch.nvr, fetch.attempts)
            return False
        log.info(
            "task %s: a stale copy of its command (request %d; the task is at request %d) "
            "does nothing",
            task_id,
            sent,
            fetch.attempts,
        )
        return False

    def park(self, command: AnalyzeTaskV1, nvr: str) -> None:
        """Ask the mirror for build ``nvr`` and retry the task after the wait."""
        attempt = command.fetch_attempt + 1
        seconds = self._settings.fetch_wait_seconds
        text = waiting_progress(nvr, attempt, self._settings.fetch_attempts, seconds)
        if not self._data.park_task(command.task_id, nvr, attempt, text):
            log.info(
                "task %s: another copy of its command moved it on; this one stops",
                command.task_id,
            )
            return
        self._send(command, nvr, attempt)
        log.info(
            "task %s: asked the mirror for build %s (request %d of %d); retrying in %d s",
            command.task_id,
            nvr,
            attempt,
            self._settings.fetch_attempts,
            seconds,
        )

    def _send(self, command: AnalyzeTaskV1, nvr: str, attempt: int) -> None:
        request = MirrorBuildV1(build=nvr, requested_by=f"analyzer, task {command.task_id}")
        self._publish(MIRROR_BUILD, request, None)
        retry = AnalyzeTaskV1(
            task_id=command.task_id,
            arch=command.arch,
            task_type=command.task_type,
            submitted_at=command.submitted_at,
            fetch_attempt=attempt,
        )
        self._later(ANALYZE_WAIT, self._settings.fetch_wait_seconds, retry, command.arch)


class BuildSyncedHandler:
    """Republishes the command of every task waiting for a build the mirror now holds.

    An early wake-up only: if it fails, the task's own copy comes back from the wait
    queue anyway, so errors are logged and the event is acked, never requeued.
    """

    def __init__(self, data: AnalyzerData, publish: Publish) -> None:
        self._data = data
        self._publish = publish

    def __call__(self, delivery: Delivery) -> None:
        event = delivery.message
        assert isinstance(event, BuildSyncedV1)
        if event.action != MirrorAction.MIRROR:
            return
        try:
            waiting = self._data.tasks_waiting_for(event.nvr)
            for task, fetch in waiting:
                command = AnalyzeTaskV1(
                    task_id=task.id,
                    arch=task.arch,
                    task_type=TaskType(task.task_type),
                    fetch_attempt=fetch.attempts,
                )
                self._publish(ANALYZE, command, task.arch)
                log.info(
                    "task %s: build %s is mirrored now; retrying it at once", task.id, event.nvr
                )
        except (sqlalchemy.exc.SQLAlchemyError, PublishError):
            log.exception("tasks waiting for build %s wait for their retry instead", event.nvr)
