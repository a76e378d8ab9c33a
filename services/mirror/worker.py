"""``retrace-mirror worker``: consume mirror commands; wait out Koji outages on the broker.

A command that fails because Koji is down or served a bad file is acked and
re-published to a wait queue (``retrace.mirror.build.wait.<n>s``, a longer one
each time, the longest from then on): after its time the broker dead-letters it
back to the mirror queue.  Nothing is lost, and nothing retries in a hot loop.
A command that can never succeed (an unknown build) is rejected, to the
dead-letter exchange where a policy names one.
"""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path
from types import FrameType

from pika.adapters.blocking_connection import BlockingChannel

from schemas.messages import MirrorBuildV1
from schemas.topology import MIRROR_BUILD, MIRROR_WAIT
from services.common.bus import (
    Consumer,
    DeadLetterConsumer,
    DeadLetterHandler,
    Delivery,
    Publisher,
    Reject,
    connect,
    declare_wait_queue,
)
from services.mirror.fetcher import BadDownload, Fetcher, UnknownBuild
from services.mirror.koji import KojiError, KojiUnavailable

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-retrace-mirror-attempt"


def wait_queue(seconds: int) -> str:
    """The name of the wait queue that holds commands for ``seconds``."""
    return MIRROR_WAIT.queue_for(seconds)


def declare_wait_queues(channel: BlockingChannel, delays: tuple[int, ...]) -> None:
    """Declare the wait queues for ``delays`` (seconds); safe to repeat."""
    for seconds in delays:
        declare_wait_queue(channel, MIRROR_WAIT, seconds)


class WaitQueues:
    """Parks a command in the wait queue for its attempt number (``mirror.retry_delays``)."""

    def __init__(self, url: str, delays: tuple[int, ...]) -> None:
        self._delays = delays
        self._publisher = Publisher(url)

    def delay_for(self, attempt: int) -> int:
        """Seconds to wait before attempt ``attempt + 1``."""
        return self._delays[min(attempt, len(self._delays)) - 1]

    def later(self, command: MirrorBuildV1, attempt: int) -> int:
        """Send ``command`` to wait; return the seconds it waits."""
        seconds = self.delay_for(attempt)
        self._publisher.publish_later(
            MIRROR_WAIT, seconds, command, None, {ATTEMPT_HEADER: attempt}
        )
        return seconds

    def close(self) -> None:
        """Close the connection, if open."""
        self._publisher.close()


class MirrorHandler:
    """The consumer's handler: one command through the fetcher, failures sorted."""

    def __init__(self, fetcher: Fetcher, waits: WaitQueues) -> None:
        self._fetcher = fetcher
        self._waits = waits

    def __call__(self, delivery: Delivery) -> None:
        command = delivery.message
        assert isinstance(command, MirrorBuildV1)
        attempt = int(delivery.headers.get(ATTEMPT_HEADER, 0)) + 1
        try:
            self._fetcher.handle(command)
        except (UnknownBuild, KojiError) as exc:
            raise Reject(str(exc)) from exc
        except ValueError as exc:
            # The index already holds a different file under this NEVRA and release
            # (an import of a local rebuild): no retry can settle that, a person must.
            raise Reject(f"build {command.build}: {exc}") from exc
        except (KojiUnavailable, BadDownload) as exc:
            self._later(command, attempt, exc)
        except Exception as exc:
            log.exception("build %s, attempt %d failed unexpectedly", command.build, attempt)
            self._later(command, attempt, exc)

    def _later(self, command: MirrorBuildV1, attempt: int, error: Exception) -> None:
        # Parked on the broker, not requeued: a requeued failure would come straight back.
        seconds = self._waits.later(command, attempt)
        log.warning(
            "build %s, attempt %d failed, retrying in %d s: %s",
            command.build,
            attempt,
            seconds,
            error,
        )


def clean_incoming(repo: Path) -> None:
    """Remove downloads an interrupted worker left behind (they were never placed)."""
    shutil.rmtree(repo / ".incoming", ignore_errors=True)


def run_worker(
    url: str,
    heartbeat: int,
    arches: tuple[str, ...],
    delays: tuple[int, ...],
    handler: MirrorHandler,
    dead_letters: DeadLetterHandler,
) -> None:
    """Consume mirror commands, and their dead letters, until SIGTERM or SIGINT."""
    connection = connect(url)
    try:
        declare_wait_queues(connection.channel(), delays)
    finally:
        connection.close()
    consumer = Consumer(url, heartbeat, arches)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        consumer.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dead = DeadLetterConsumer(
        url, heartbeat, arches, [MIRROR_BUILD.dead_letter_queue_for()], dead_letters
    )
    dead.start()
    try:
        consumer.run(MIRROR_BUILD, handler)
    finally:
        dead.stop()
