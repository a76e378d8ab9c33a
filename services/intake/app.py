"""The intake's WSGI application: ``create_app`` takes every collaborator it uses."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import falcon

from schemas.messages import Message
from schemas.topology import Route
from services.common.bus import Publish
from services.common.data.intake import IntakeData
from services.common.data.mirror import MirrorData
from services.common.settings import IntakeConfig
from services.common.spool import Spool
from services.intake import passwords
from services.intake.catalog import CheckPackageResource, MirrorLookup, SettingsResource
from services.intake.clients import RequireHttps
from services.intake.create import CreateResource, disk_free
from services.intake.errors import Refusal, render_refusal
from services.intake.health import (
    BrokerProbe,
    HeartbeatResource,
    LbHeartbeatResource,
    VersionResource,
)
from services.intake.leases import Leases
from services.intake.metrics import Metrics, MetricsMiddleware, MetricsResource
from services.intake.openapi import OpenApiResource
from services.intake.tasks import TaskResource
from services.intake.upload import MIB, FreeSpace, Opener, open_new

log = logging.getLogger(__name__)


class Publishing:
    """Serializes publishes from a threaded worker onto one non-thread-safe publisher."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._lock = threading.Lock()

    def __call__(self, route: Route, message: Message, arch: str | None = None) -> None:
        with self._lock:
            self._publish(route, message, arch)


TASK_ID_LENGTH = 24


def new_task_id() -> str:
    """An unguessable task id: 24 letters and digits, about 143 random bits."""
    return passwords.random_token(TASK_ID_LENGTH)


class _Unprobed:
    """A broker probe for an app built without one: never healthy, depth unknown."""

    def check(self) -> None:
        raise OSError("no broker probe configured")

    def queue_depth(self) -> int | None:
        return None


def create_app(
    settings: IntakeConfig,
    data: IntakeData,
    index: MirrorData,
    spool: Spool,
    publish: Publish,
    new_id: Callable[[], str] = new_task_id,
    free_space: FreeSpace = disk_free,
    broker: BrokerProbe | None = None,
    metrics: Metrics | None = None,
    opener: Opener = open_new,
    leases: Leases | None = None,
    upload_slots: int | None = None,
) -> falcon.App[falcon.Request, falcon.Response]:
    """The intake application, wired to the collaborators it is given.

    ``opener`` makes the files of an upload; ``leases`` records uploads in flight
    (a :class:`Leases` that is not started by default); ``upload_slots`` caps the
    uploads this process receives at once.
    """
    limits = settings.intake
    metrics = metrics or Metrics()
    broker = broker or _Unprobed()
    middleware: list[Any] = [MetricsMiddleware(metrics)]
    if limits.require_https:
        middleware.append(RequireHttps(limits.trusted_proxies))
    app: falcon.App[falcon.Request, falcon.Response] = falcon.App(
        media_type=falcon.MEDIA_TEXT, middleware=middleware
    )
    app.req_options.strip_url_path_trailing_slash = True

    def refused(
        req: falcon.Request, resp: falcon.Response, error: Refusal, params: dict[str, Any]
    ) -> None:
        if req.path == "/create" and req.method == "POST":
            metrics.refused_uploads.labels(error.code).inc()
        render_refusal(req, resp, error, params)

    app.add_error_handler(Refusal, refused)
    key = passwords.server_key(limits.password_key, spool.root)
    metrics.watch(data, spool.root, free_space, broker.queue_depth)
    # One publisher, one lock: uploads and /checkpackage publish from many threads.
    publishing = Publishing(publish)
    app.add_route(
        "/create",
        CreateResource(
            settings,
            data,
            spool,
            publishing,
            new_id,
            free_space,
            metrics,
            opener,
            leases,
            upload_slots,
        ),
    )
    app.add_route("/settings", SettingsResource(limits, data, index))
    mirror = (
        MirrorLookup(limits.mirror_url, limits.mirror_timeout_seconds)
        if limits.mirror_url
        else None
    )
    app.add_route("/checkpackage", CheckPackageResource(limits, index, publishing, mirror))
    app.add_route("/metrics", MetricsResource(metrics))
    app.add_route("/openapi.json", OpenApiResource())
    app.add_route("/__lbheartbeat__", LbHeartbeatResource())
    app.add_route(
        "/__heartbeat__",
        HeartbeatResource(data.db, broker, spool.root, free_space, limits.min_free_space_mib * MIB),
    )
    app.add_route("/__version__", VersionResource())
    tasks = TaskResource(limits, data, spool, key)
    app.add_route("/{task_id}", tasks)
    app.add_route("/{task_id}/log", tasks, suffix="log")
    app.add_route("/{task_id}/backtrace", tasks, suffix="backtrace")
    return app
