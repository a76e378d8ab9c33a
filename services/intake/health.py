"""Health and identity: ``/__lbheartbeat__``, ``/__heartbeat__``, ``/__version__``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Protocol

import falcon
import pika.exceptions
import sqlalchemy as sa

from schemas.topology import ANALYZE
from services.common.bus import connect
from services.common.data.db import Database

log = logging.getLogger(__name__)


class BrokerProbe(Protocol):
    """What the health check and the metrics ask the broker."""

    def check(self) -> None:
        """Raise unless the broker answers."""

    def queue_depth(self) -> int | None:
        """Analyze commands waiting, or ``None`` when the broker does not answer."""


class AmqpProbe:
    """Asks our RabbitMQ over a short-lived connection (health checks are infrequent)."""

    def __init__(self, url: str, arches: tuple[str, ...]) -> None:
        self._url = url
        self._arches = arches

    def check(self) -> None:
        connect(self._url, heartbeat=10).close()

    def queue_depth(self) -> int | None:
        try:
            connection = connect(self._url, heartbeat=10)
        except (pika.exceptions.AMQPError, OSError):
            return None
        total = 0
        try:
            for arch in self._arches:
                channel = connection.channel()
                declared = channel.queue_declare(ANALYZE.queue_for(arch), passive=True)
                total += declared.method.message_count or 0
        except (pika.exceptions.AMQPError, OSError):
            return None
        finally:
            if connection.is_open:
                connection.close()
        return total


class LbHeartbeatResource:
    """``/__lbheartbeat__``: the process answers; nothing else is checked."""

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = "{}"

    on_head = on_get


class HeartbeatResource:
    """``/__heartbeat__``: the database, the broker and the spool's free space."""

    def __init__(
        self,
        db: Database,
        broker: BrokerProbe,
        spool: Path,
        free_space: Callable[[Path], int],
        min_free: int,
    ) -> None:
        self._db = db
        self._broker = broker
        self._spool = spool
        self._free_space = free_space
        self._min_free = min_free

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        checks = {
            "database": self._database(),
            "broker": self._broker_ok(),
            "spool": self._spool_ok(),
        }
        failing = [name for name, problem in checks.items() if problem]
        resp.content_type = falcon.MEDIA_JSON
        resp.text = json.dumps(
            {
                "status": "error" if failing else "ok",
                "checks": {name: problem or "ok" for name, problem in checks.items()},
            }
        )
        if failing:
            resp.status = falcon.HTTP_503
            resp.set_header("Retry-After", "30")

    def _database(self) -> str:
        try:
            self._db.ping()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("heartbeat: database: %s", exc)
            return "the database does not answer"
        return ""

    def _broker_ok(self) -> str:
        try:
            self._broker.check()
        except (pika.exceptions.AMQPError, OSError) as exc:
            log.warning("heartbeat: broker: %r", exc)
            return "the broker does not answer"
        return ""

    def _spool_ok(self) -> str:
        try:
            free = self._free_space(self._spool)
        except OSError as exc:
            return f"the spool cannot be read: {exc.strerror}"
        if free < self._min_free:
            return f"the spool has {free >> 20} MiB free, less than {self._min_free >> 20} MiB"
        return ""


class VersionResource:
    """``/__version__``: which Retrace Server this is."""

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        try:
            version = metadata.version("retrace-server")
        except metadata.PackageNotFoundError:
            version = "unknown"
        resp.content_type = falcon.MEDIA_JSON
        resp.text = json.dumps(
            {
                "name": "retrace-server",
                "version": version,
            }
        )
