"""``GET /<id>``, ``/<id>/log``, ``/<id>/backtrace`` and ``DELETE /<id>``, guarded by the
task password (single-use by default; see :mod:`services.intake.passwords`)."""

from __future__ import annotations

import logging
import math
import re
from datetime import UTC, datetime, timedelta

import falcon

from schemas.messages import TASK_ID_PATTERN
from services.common.data.intake import IntakeData, Task, TaskStatus
from services.common.settings import IntakeSettings
from services.common.spool import BACKTRACE, BACKTRACE_JSON, LOG, Spool
from services.intake import passwords
from services.intake.clients import client_address
from services.intake.errors import Refusal

log = logging.getLogger(__name__)

STATUS_NAMES = {
    TaskStatus.SUBMITTING: "PENDING",
    TaskStatus.QUEUED: "PENDING",
    TaskStatus.RUNNING: "PENDING",
    TaskStatus.SUCCESS: "FINISHED_SUCCESS",
    TaskStatus.FAILURE: "FINISHED_FAILURE",
}

TASK_ID = re.compile(TASK_ID_PATTERN)

# The password just replaced may be replayed this many times in the grace window.
REPLAYS = 1


class TaskResource:
    """One task's status and results."""

    def __init__(
        self, settings: IntakeSettings, data: IntakeData, spool: Spool, key: bytes
    ) -> None:
        self._settings = settings
        self._data = data
        self._spool = spool
        self._key = key

    def _authorized(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> Task:
        task = self._data.get_task(task_id) if TASK_ID.match(task_id) else None
        if task is None or task.status == TaskStatus.SUBMITTING:
            raise Refusal(404, f"there is no task {task_id[:64]!r}", code="no_task")
        presented = req.get_header("X-Task-Password") or ""
        if self._settings.password_mode == "static":  # noqa: S105 -- a mode, not a password
            if passwords.matches(presented, task.password_digest):
                return task
        else:
            following = self._rotate(task, presented)
            if following is not None:
                resp.set_header("X-Task-Password", following)
                return task
        self._wrong_password(req, task_id)
        raise AssertionError("unreachable")

    def _rotate(self, task: Task, presented: str) -> str | None:
        """The password for the next request, or ``None`` if ``presented`` is wrong."""
        if not presented:
            return None
        used = passwords.digest(presented)
        following = passwords.following(self._key, task.id, presented)
        if passwords.matches(presented, task.password_digest) and self._data.rotate_password(
            task.id, used, passwords.digest(following)
        ):
            return following
        # Either the client lost our last answer and sends the old password again, or a
        # concurrent request with the same password rotated first: both get the same
        # next password.  Read again, the row may have moved on since.
        since = datetime.now(UTC) - timedelta(seconds=self._settings.password_grace_seconds)
        if self._data.replay_password(task.id, used, since, REPLAYS):
            return following
        return None

    def _wrong_password(self, req: falcon.Request, task_id: str) -> None:
        client = client_address(req, self._settings.trusted_proxies)
        window = self._settings.wrong_password_window_seconds
        start = datetime.now(UTC) - timedelta(seconds=window)
        failures = self._data.count_password_failure(task_id, client, start)
        if failures > self._settings.wrong_password_limit:
            raise Refusal(
                429,
                f"too many wrong passwords for task {task_id} from {client}; try again later",
                {"Retry-After": str(math.ceil(window))},
                code="password_limit",
            )
        raise Refusal(403, "the X-Task-Password header is missing or wrong", code="password")

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task = self._authorized(req, resp, task_id)
        resp.set_header("X-Task-Status", STATUS_NAMES[task.status])
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = task.progress + "\n"

    def on_get_log(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task = self._authorized(req, resp, task_id)
        self._send(resp, task, LOG, "the log exists once the task has finished")

    def on_get_backtrace(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task = self._authorized(req, resp, task_id)
        if task.status != TaskStatus.SUCCESS:
            raise Refusal(
                404,
                "the backtrace exists once the task has finished successfully",
                code="no_result",
            )
        if req.client_prefers((falcon.MEDIA_TEXT, falcon.MEDIA_JSON)) == falcon.MEDIA_JSON:
            self._send(resp, task, BACKTRACE_JSON, "the task has no structured backtrace")
            resp.content_type = falcon.MEDIA_JSON
        else:
            self._send(resp, task, BACKTRACE, "the task has no backtrace")

    def on_delete(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        """Forget the task and its files at once.  An analyzer still working on it finds
        no row to move to a final state, so its results are never recorded."""
        self._authorized(req, resp, task_id)
        self._data.delete_task(task_id)
        self._spool.remove(task_id)
        log.info("task %s deleted by its owner", task_id)
        resp.status = falcon.HTTP_204
        resp.headers.pop("x-task-password", None)

    def _send(self, resp: falcon.Response, task: Task, name: str, missing: str) -> None:
        # Only the folder the row names: written whole and synced before the update
        # that finished the task named it.
        data = self._spool.read_result(task.id, task.results, name) if task.status.final else None
        if data is None:
            raise Refusal(404, missing, code="no_result")
        resp.content_type = falcon.MEDIA_TEXT
        resp.data = data
