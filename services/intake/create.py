"""``POST /create``: admit an upload, unpack it into the spool, record and queue the task.

The checks run in the original server's order, cheapest first: admission (503),
content type (415), length (411, 413), free space (507), this client's uploads in
flight (429); then the archive is unpacked while it arrives.  A task row and its
message cannot be written atomically, so the task is recorded as submitting, the
analyze command is published with a confirm, and only then is the task queued.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import falcon

from schemas.messages import AnalyzeTaskV1, TaskType
from schemas.topology import ANALYZE
from services.common import progress
from services.common.bus import Publish, PublishError
from services.common.data.intake import IntakeData, TaskStatus
from services.common.settings import IntakeConfig
from services.common.spool import Spool
from services.intake import passwords
from services.intake.clients import client_address
from services.intake.errors import Refusal
from services.intake.leases import Leases
from services.intake.metrics import Metrics
from services.intake.upload import (
    DECODERS,
    MIB,
    Body,
    FreeSpace,
    Limits,
    Opener,
    check_free_space,
    disk_full_refused,
    open_new,
    receive,
)

log = logging.getLogger(__name__)

# Tasks that hold an analyzer or wait for one: the original's "running tasks".
ACTIVE = (TaskStatus.SUBMITTING, TaskStatus.QUEUED, TaskStatus.RUNNING)

TASK_TYPES = {"0": TaskType.RETRACE, "1": TaskType.DEBUG}
# Known to the original protocol (vmcore, interactive) but not offered here.
TASK_TYPES_NOT_OFFERED = {"2": "kernel vmcore", "3": "interactive", "4": "interactive vmcore"}

RETRY_FULL = "60"

_NO_LIMITS = Limits(declared=0, max_unpacked=0, min_free=0, decoder_memory=0, deadline=float("inf"))


def disk_free(path: Path) -> int:
    """Bytes free on the filesystem holding ``path``."""
    return shutil.disk_usage(path).free


def task_type_of(header: str | None) -> TaskType:
    """The task type asked for by ``X-Task-Type`` (absent: a core retrace)."""
    if header is None or header.strip() == "":
        return TaskType.RETRACE
    value = header.strip()
    if value in TASK_TYPES:
        return TASK_TYPES[value]
    if value in TASK_TYPES_NOT_OFFERED:
        raise Refusal(
            409,
            f"X-Task-Type {value} ({TASK_TYPES_NOT_OFFERED[value]}) is not offered by this "
            "server; send 0 (core retrace) or 1 (debug)",
            code="task_type",
        )
    raise Refusal(
        400, f"X-Task-Type {value[:20]!r} is not a task type; send 0 or 1", code="task_type"
    )


class CreateResource:
    """``POST /create``: receive a crash archive and queue its retrace."""

    def __init__(
        self,
        settings: IntakeConfig,
        data: IntakeData,
        spool: Spool,
        publish: Publish,
        new_id: Callable[[], str],
        free_space: FreeSpace = disk_free,
        metrics: Metrics | None = None,
        opener: Opener = open_new,
        leases: Leases | None = None,
        upload_slots: int | None = None,
    ) -> None:
        self._settings = settings
        self._data = data
        self._spool = spool
        self._publish = publish
        self._new_id = new_id
        self._free_space = free_space
        self._metrics = metrics or Metrics()
        self._open = opener
        self._leases = leases or Leases(data, spool)
        # Uploads this process receives at once (None: no cap of its own).
        self._slots = threading.BoundedSemaphore(upload_slots) if upload_slots else None
        self._slot_count = upload_slots

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            if self._slots is None:
                self._create(req, resp)
                return
            # An upload holds a thread of its worker while it is received: a worker
            # whose upload slots are taken refuses more at once, so that its other
            # threads stay free for status requests and heartbeats.
            if not self._slots.acquire(blocking=False):
                raise Refusal(
                    503,
                    f"this server is receiving {self._slot_count} uploads at once already; "
                    "try again later",
                    {"Retry-After": "10"},
                    code="upload_slots",
                )
            try:
                self._create(req, resp)
            finally:
                self._slots.release()
        except Refusal as refusal:
            body: Body | None = getattr(req.context, "upload_body", None)
            if (body is None or body.received == 0) and (req.content_length or 0) > 0:
                # Refused before a byte of the body was read (too many uploads, no
                # space, busy): answer at once instead of reading a body we do not
                # want, and close the connection; the server lingers a bounded time
                # reading, so the client sees the answer, not a reset.
                refusal.headers["Connection"] = "close"
            raise

    def _create(self, req: falcon.Request, resp: falcon.Response) -> None:
        limits = self._settings.intake
        task_type = task_type_of(req.get_header("X-Task-Type"))
        if self._data.count_tasks(ACTIVE) >= limits.max_running_tasks:
            raise Refusal(
                503,
                f"the server is busy with {limits.max_running_tasks} tasks; try again later",
                {"Retry-After": RETRY_FULL},
                code="busy",
            )
        content_type = (req.content_type or "").split(";")[0].strip().lower()
        if content_type not in DECODERS:
            raise Refusal(
                415,
                f"content type {content_type or '(none)'!r} is not supported; "
                f"send one of {', '.join(DECODERS)}",
                code="content_type",
            )
        if req.content_length is None:
            raise Refusal(411, "the upload must carry a Content-Length header", code="length")
        if req.content_length > limits.max_packed_size_mib * MIB:
            # Too big to read and drop: answer at once, and make the server take the
            # rest of the body as ended rather than read it to reach the next request.
            Body(req.bounded_stream, _NO_LIMITS, req.env.get("gunicorn.socket")).abandon()
            raise Refusal(
                413,
                f"the archive is larger than the {limits.max_packed_size_mib} MiB limit",
                code="packed_size",
            )
        body = Body(
            req.bounded_stream,
            Limits(
                declared=req.content_length,
                max_unpacked=limits.max_unpacked_size_mib * MIB,
                min_free=limits.min_free_space_mib * MIB,
                decoder_memory=limits.decoder_memory_mib * MIB,
                deadline=time.monotonic() + limits.upload_timeout_seconds,
            ),
            req.env.get("gunicorn.socket"),
        )
        req.context.upload_body = body
        upload_id = self._new_id()
        try:
            task_id, password, arch = self._receive(req, body, upload_id, content_type, task_type)
        except Refusal as refusal:
            if refusal.code == "timeout":
                body.abandon()
            elif body.received:
                body.drain()
            raise
        finally:
            body.release()
            self._data.end_upload(upload_id)
            self._metrics.received_bytes.inc(body.received)
        self._metrics.created_tasks.labels(task_type.value).inc()
        log.info("task %s created (%s, %s)", task_id, arch, task_type)
        resp.status = falcon.HTTP_201
        resp.set_header("X-Task-Id", task_id)
        resp.set_header("X-Task-Password", password)
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = ""

    def _receive(
        self,
        req: falcon.Request,
        body: Body,
        upload_id: str,
        content_type: str,
        task_type: TaskType,
    ) -> tuple[str, str, str]:
        limits = self._settings.intake
        self._spool.root.mkdir(parents=True, exist_ok=True)
        check_free_space(
            self._free_space, self._spool.root, body.limits.min_free, body.limits.declared
        )
        client = client_address(req, limits.trusted_proxies)
        since = datetime.now(UTC) - timedelta(seconds=limits.upload_timeout_seconds)
        # The row (with this worker's lease) names the folder before the folder exists,
        # so a worker killed at any point leaves nothing a sweep would not find.
        task_id = self._new_id()
        in_flight = self._leases.begin(upload_id, client, task_id, since)
        if in_flight > limits.max_uploads_per_client:
            raise Refusal(
                429,
                f"{client} already has {limits.max_uploads_per_client} uploads in progress",
                {"Retry-After": "30"},
                code="client_uploads",
            )
        with disk_full_refused("making the task's folder"):
            crash_dir = self._spool.create(task_id)
        recorded = False
        try:
            crash = receive(
                body, content_type, crash_dir, body.limits, self._free_space, self._open
            )
            if crash.arch not in limits.arches:
                raise Refusal(
                    400,
                    f"the core dump is for {crash.arch}; this server retraces "
                    f"{', '.join(limits.arches)}",
                    code="arch",
                )
            password = passwords.new_password()
            self._data.create_task(
                task_id, passwords.digest(password), crash.arch, task_type, progress.QUEUED
            )
            recorded = True
            command = AnalyzeTaskV1(task_id=task_id, arch=crash.arch, task_type=task_type)
            try:
                self._publish(ANALYZE, command, crash.arch)
            except PublishError as exc:
                log.error("task %s not queued: %s", task_id, exc)
                raise Refusal(
                    503,
                    "the task queue is unavailable; try again later",
                    {"Retry-After": RETRY_FULL},
                    code="broker",
                ) from exc
            self._data.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
        except BaseException:
            # Whatever happened (a refusal, the client gone, a bug), leave nothing.
            if recorded:
                self._data.delete_task(task_id)
            self._spool.remove(task_id)
            raise
        return task_id, password, crash.arch
