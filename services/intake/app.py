"""The intake's WSGI application: ``create_app`` takes every collaborator it uses."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

import falcon

from schemas.messages import AnalyzeTaskV1, Message, TaskType
from schemas.topology import ANALYZE, Route
from services.common import progress
from services.common.bus import Publish, PublishError
from services.common.settings import Settings
from services.common.spool import Spool
from services.common.store import Store, TaskStatus
from services.intake import passwords
from services.intake.errors import Refusal, render_refusal
from services.intake.tasks import TaskResource
from services.intake.upload import DECODERS, receive

log = logging.getLogger(__name__)

MIB = 1 << 20


class CreateResource:
    """``POST /create``: receive a crash archive and queue its retrace."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        spool: Spool,
        publish: Publish,
        new_id: Callable[[], str],
    ) -> None:
        self._settings = settings
        self._store = store
        self._spool = spool
        self._publish = publish
        self._new_id = new_id

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        limits = self._settings.intake
        content_type = (req.content_type or "").split(";")[0].strip().lower()
        if content_type not in DECODERS:
            raise Refusal(
                415,
                f"content type {content_type or '(none)'!r} is not supported; "
                f"send one of {', '.join(DECODERS)}",
            )
        if req.content_length is None:
            raise Refusal(411, "the upload must carry a Content-Length header")
        if req.content_length > limits.max_packed_size_mib * MIB:
            raise Refusal(
                413, f"the archive is larger than the {limits.max_packed_size_mib} MiB limit"
            )
        task_id = self._new_id()
        crash_dir = self._spool.create(task_id)
        recorded = False
        try:
            crash = receive(
                req.bounded_stream, content_type, crash_dir, limits.max_unpacked_size_mib * MIB
            )
            if crash.arch not in limits.arches:
                raise Refusal(
                    400,
                    f"the core dump is for {crash.arch}; this server retraces "
                    f"{', '.join(limits.arches)}",
                )
            password = passwords.new_password()
            self._store.create_task(
                task_id, passwords.digest(password), crash.arch, TaskType.RETRACE, progress.QUEUED
            )
            recorded = True
            command = AnalyzeTaskV1(task_id=task_id, arch=crash.arch)
            try:
                self._publish(ANALYZE, command, crash.arch)
            except PublishError as exc:
                log.error("task %s not queued: %s", task_id, exc)
                raise Refusal(
                    503, "the task queue is unavailable; try again later", {"Retry-After": "60"}
                ) from exc
            self._store.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
        except BaseException:
            req.bounded_stream.exhaust()
            if recorded:
                self._store.delete_task(task_id)
            self._spool.remove(task_id)
            raise
        log.info("task %s created for %s (%s)", task_id, crash.package, crash.arch)
        resp.status = falcon.HTTP_201
        resp.set_header("X-Task-Id", task_id)
        resp.set_header("X-Task-Password", password)
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = ""


class SettingsResource:
    """``GET /settings``: limits and formats, in the original's ``key value`` lines."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        limits = self._settings.intake
        lines = {
            "max_packed_size": limits.max_packed_size_mib,
            "max_unpacked_size": limits.max_unpacked_size_mib,
            "supported_formats": " ".join(DECODERS),
        }
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "".join(f"{k} {v}\n" for k, v in lines.items())


class Publishing:
    """Serializes publishes from a threaded worker onto one non-thread-safe publisher."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._lock = threading.Lock()

    def __call__(self, route: Route, message: Message, arch: str | None = None) -> None:
        with self._lock:
            self._publish(route, message, arch)


def new_task_id() -> str:
    """An unguessable, URL-safe task id (144 random bits)."""
    return secrets.token_urlsafe(18)


def create_app(
    settings: Settings,
    store: Store,
    spool: Spool,
    publish: Publish,
    new_id: Callable[[], str] = new_task_id,
) -> falcon.App[falcon.Request, falcon.Response]:
    """The intake application, wired to the collaborators it is given."""
    app: falcon.App[falcon.Request, falcon.Response] = falcon.App(media_type=falcon.MEDIA_TEXT)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Refusal, render_refusal)
    publishing = Publishing(publish)
    app.add_route("/create", CreateResource(settings, store, spool, publishing, new_id))
    app.add_route("/settings", SettingsResource(settings))
    tasks = TaskResource(store, spool)
    app.add_route("/{task_id}", tasks)
    app.add_route("/{task_id}/log", tasks, suffix="log")
    app.add_route("/{task_id}/backtrace", tasks, suffix="backtrace")
    return app
