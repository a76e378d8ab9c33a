"""``retrace-mirror listen``: Koji's build messages in, mirror commands out.

A fedora-messaging consumer of ``buildsys.build.state.change`` on the broker
that carries Koji's messages (Fedora's in production), configured from our
settings.  The callback stays thin: it decides, forwards a :class:`MirrorBuildV1`
to our fetch queue and returns; it never downloads.  A catch-up thread asks Koji
for builds completed since the last one seen, on start and periodically, so a
build that completed while nobody listened is still mirrored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from fedora_messaging import api as fm_api
from fedora_messaging import config as fm_config
from fedora_messaging import exceptions as fm_exceptions
from fedora_messaging import message as fm_message
from koji_fedoramessaging_messages.build import BuildStateChangeV1

from schemas.messages import MirrorAction, MirrorBuildV1
from schemas.topology import KOJI_BUILD_TOPIC, MIRROR_BUILD, koji_topic
from services.common import architecture
from services.common.bus import Publisher, PublishError
from services.common.data.mirror import MirrorData
from services.common.rpm import os_release_of
from services.common.settings import MirrorConfig
from services.mirror.koji import BuildState, KojiError, KojiHub, KojiUnavailable

log = logging.getLogger(__name__)

CURSOR = "koji-completed"
"""The store's cursor: the completion time of the newest build the catch-up saw."""

Send = Callable[[MirrorBuildV1], None]


def fedora_messaging_settings(settings: MirrorConfig) -> dict[str, Any]:
    """fedora-messaging's configuration, built from ours (there is no second file)."""
    mirror = settings.mirror

    def path(p: Any) -> str | None:
        return None if p is None else str(settings.resolve(p))

    queue = mirror.koji_queue
    return {
        "amqp_url": mirror.koji_broker_url,
        "tls": {
            "ca_cert": path(mirror.koji_broker_ca_cert),
            "certfile": path(mirror.koji_broker_certfile),
            "keyfile": path(mirror.koji_broker_keyfile),
        },
        "client_properties": {"app": "retrace-mirror"},
        "queues": {
            queue: {
                "durable": mirror.koji_queue_durable,
                "auto_delete": not mirror.koji_queue_durable,
                "exclusive": False,
                "arguments": {},
            }
        },
        "bindings": [
            {
                "queue": queue,
                "exchange": mirror.koji_exchange,
                "routing_keys": [koji_topic(mirror.koji_topic_prefix)],
            }
        ],
        "qos": {"prefetch_size": 0, "prefetch_count": 1},
    }


def configure_fedora_messaging(settings: MirrorConfig) -> dict[str, Any]:
    """Load ``fedora_messaging.config.conf`` from our settings; return what was set."""
    ours = fedora_messaging_settings(settings)
    # An empty file: FEDORA_MESSAGING_CONF and /etc/fedora-messaging are not consulted.
    fm_config.conf.load_config(config_path=os.devnull)
    fm_config.conf.update(ours)
    fm_config.conf._validate()
    return ours


class BuildListener:
    """The fedora-messaging callback: act on a completed (or deleted) build, ignore the rest."""

    def __init__(self, settings: MirrorConfig, send: Send, retry_pause: float = 5.0) -> None:
        self._mirror = settings.mirror
        self._send = send
        self._retry_pause = retry_pause
        self._lock = threading.Lock()

    def command_for(  # noqa: PLR0911 -- one early return per reason to ignore a message
        self, body: Mapping[str, Any]
    ) -> tuple[MirrorBuildV1 | None, str]:
        """The command a build message calls for, or ``None`` and why not."""
        if body.get("attribute") != "state":
            return None, f"a change of {body.get('attribute')!r}, not of the state"
        if body.get("instance", "primary") != "primary":
            return None, f"from Koji instance {body.get('instance')!r}"
        new = body.get("new")
        build_id = body.get("build_id")
        if not isinstance(build_id, int):
            return None, "no build id"
        name = str(body.get("name", ""))
        if self._mirror.packages and name not in self._mirror.packages:
            return None, f"{name} is not in mirror.packages"
        release = os_release_of(str(body.get("release", "")))
        if (
            self._mirror.releases
            and not self._mirror.tag_releases
            and release not in self._mirror.releases
        ):
            return None, f"{release or 'no release'} is not in mirror.releases"
        if new == BuildState.COMPLETE:
            return MirrorBuildV1(build=build_id, requested_by="koji-message"), "completed"
        if new == BuildState.DELETED:
            if not self._mirror.delete_on_deleted:
                return None, "deleted, but mirror.delete_on_deleted is off"
            command = MirrorBuildV1(
                build=build_id, action=MirrorAction.REMOVE, requested_by="koji-message"
            )
            return command, "deleted"
        state = BuildState(new).name if new in {s.value for s in BuildState} else repr(new)
        return None, f"its new state is {state}"

    def __call__(self, message: fm_message.Message) -> None:
        body = message.body
        if not isinstance(message, BuildStateChangeV1) and not message.topic.endswith(
            KOJI_BUILD_TOPIC
        ):
            log.debug("ignoring %s", message.topic)
            return
        command, why = self.command_for(body)
        nvr = f"{body.get('name')}-{body.get('version')}-{body.get('release')}"
        if command is None:
            log.info("ignoring build %s (%s): %s", nvr, body.get("build_id"), why)
            return
        try:
            with self._lock:
                self._send(command)
        except PublishError as exc:
            # Our broker is away: the message goes back to Koji's queue, after a pause
            # so that an outage does not turn into a hot loop.
            log.error("cannot forward build %s: %s; requeueing", nvr, exc)
            time.sleep(self._retry_pause)
            raise fm_exceptions.Nack() from exc
        log.info("build %s (%d) %s: %s sent", nvr, command.build, why, command.action)


class CatchUp:
    """Asks Koji for builds completed since the newest one seen, and sends them."""

    def __init__(self, koji: KojiHub, data: MirrorData, settings: MirrorConfig, send: Send) -> None:
        self._koji = koji
        self._data = data
        self._mirror = settings.mirror
        self._send = send

    def run_once(self) -> int:
        """One catch-up; return how many builds were sent.

        The first run of a new mirror only starts the clock: history is backfilled
        on purpose, with ``retrace-mirror sync --since``.
        """
        cursor = self._data.get_cursor(CURSOR)
        if cursor is None:
            self._data.set_cursor(CURSOR, datetime.now(UTC))
            log.info("catch-up starts from now; backfill with 'retrace-mirror sync --since'")
            return 0
        builds = self._koji.completed_since(cursor)
        sent = 0
        for build in builds:
            if not self._mirror.packages or build.name in self._mirror.packages:
                self._send(MirrorBuildV1(build=build.id, requested_by="catch-up"))
                sent += 1
            if build.completed_at is not None and build.completed_at > cursor:
                cursor = build.completed_at
                self._data.set_cursor(CURSOR, cursor)
        log.info("catch-up: %d builds completed since the last seen, %d sent", len(builds), sent)
        return sent

    def run_forever(self, interval: float, stop: threading.Event) -> None:
        """Catch up now and every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.run_once()
            except (KojiUnavailable, KojiError, PublishError) as exc:
                log.warning("catch-up failed, trying again in %g s: %s", interval, exc)
            stop.wait(interval)


def listen(settings: MirrorConfig, data: MirrorData, koji: KojiHub) -> None:
    """Run the listener and its catch-up until the process is stopped."""
    publisher = Publisher(settings.broker.url, settings.broker.heartbeat, architecture.MIRROR.bus)
    lock = threading.Lock()

    def send(command: MirrorBuildV1) -> None:
        with lock:
            publisher.publish(MIRROR_BUILD, command)

    stop = threading.Event()
    catch_up = CatchUp(koji, data, settings, send)
    thread = threading.Thread(
        target=catch_up.run_forever,
        args=(settings.mirror.catch_up_interval, stop),
        name="catch-up",
        daemon=True,
    )
    thread.start()
    ours = configure_fedora_messaging(settings)
    log.info(
        "listening for %s on %s",
        ours["bindings"][0]["routing_keys"][0],
        settings.masked()["mirror"]["koji_broker_url"],
    )
    try:
        fm_api.consume(BuildListener(settings, send), ours["bindings"], ours["queues"])
    finally:
        stop.set()
        publisher.close()
