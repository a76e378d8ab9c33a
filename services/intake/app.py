"""The intake's WSGI application: ``create_app`` takes every collaborator it uses."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

import falcon

from schemas.messages import Message
from schemas.topology import Route
from services.common.bus import Publish
from services.common.settings import Settings
from services.common.spool import Spool
from services.common.store import Store
from services.intake import passwords
from services.intake.create import ACTIVE, CreateResource, disk_free
from services.intake.errors import Refusal, render_refusal
from services.intake.tasks import TaskResource
from services.intake.upload import DECODERS, FreeSpace

log = logging.getLogger(__name__)


class SettingsResource:
    """``GET /settings``: limits and formats, in the original's ``key value`` lines."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        limits = self._settings.intake
        lines = {
            "running_tasks": self._store.count_tasks(ACTIVE),
            "max_running_tasks": limits.max_running_tasks,
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
    free_space: FreeSpace = disk_free,
) -> falcon.App[falcon.Request, falcon.Response]:
    """The intake application, wired to the collaborators it is given."""
    app: falcon.App[falcon.Request, falcon.Response] = falcon.App(media_type=falcon.MEDIA_TEXT)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Refusal, render_refusal)
    publishing = Publishing(publish)
    app.add_route("/create", CreateResource(settings, store, spool, publishing, new_id, free_space))
    app.add_route("/settings", SettingsResource(settings, store))
    key = passwords.server_key(settings.intake.password_key, spool.root)
    tasks = TaskResource(settings.intake, store, spool, key)
    app.add_route("/{task_id}", tasks)
    app.add_route("/{task_id}/log", tasks, suffix="log")
    app.add_route("/{task_id}/backtrace", tasks, suffix="backtrace")
    return app
