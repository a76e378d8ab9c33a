"""``GET /<id>``, ``/<id>/log`` and ``/<id>/backtrace``, guarded by the task password."""

from __future__ import annotations

import falcon

from services.common.spool import BACKTRACE, LOG, Spool
from services.common.store import Store, Task, TaskStatus
from services.intake import passwords
from services.intake.errors import Refusal

STATUS_NAMES = {
    TaskStatus.SUBMITTING: "PENDING",
    TaskStatus.QUEUED: "PENDING",
    TaskStatus.RUNNING: "PENDING",
    TaskStatus.SUCCESS: "FINISHED_SUCCESS",
    TaskStatus.FAILURE: "FINISHED_FAILURE",
}


class TaskResource:
    """One task's status and results."""

    def __init__(self, store: Store, spool: Spool) -> None:
        self._store = store
        self._spool = spool

    def _authorized(self, req: falcon.Request, task_id: str) -> Task:
        task = self._store.get_task(task_id)
        if task is None or task.status == TaskStatus.SUBMITTING:
            raise Refusal(404, f"there is no task {task_id}")
        if not passwords.matches(req.get_header("X-Task-Password"), task.password_digest):
            raise Refusal(403, "the X-Task-Password header is missing or wrong")
        return task

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task = self._authorized(req, task_id)
        resp.set_header("X-Task-Status", STATUS_NAMES[task.status])
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = task.progress + "\n"

    def on_get_log(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task = self._authorized(req, task_id)
        self._send(resp, task, LOG, "the log exists once the task has finished")

    def on_get_backtrace(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task = self._authorized(req, task_id)
        if task.status != TaskStatus.SUCCESS:
            raise Refusal(404, "the backtrace exists once the task has finished successfully")
        self._send(resp, task, BACKTRACE, "the task has no backtrace")

    def _send(self, resp: falcon.Response, task: Task, name: str, missing: str) -> None:
        data = self._spool.read_result(task.id, name) if task.status.final else None
        if data is None:
            raise Refusal(404, missing)
        resp.content_type = falcon.MEDIA_TEXT
        resp.data = data
