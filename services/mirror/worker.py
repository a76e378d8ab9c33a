"""``retrace-mirror worker``: consume mirror commands; wait out Koji outages on the broker.

Each failure of a command is sorted into one of four kinds:

- **Koji unreachable** (the hub or the file server down, timing out, answering 5xx):
  the command is acked and re-published to a wait queue
  (``retrace.mirror.build.wait.<n>s``, a longer one each time, the longest from then
  on), after whose time the broker dead-letters it back to the mirror queue.  It is
  retried for as long as the outage lasts, never dead-lettered; the data keeps when
  the worker last reached Koji and last failed to (:class:`KojiHealth`), which the
  mirror's ``/metrics`` shows.
- **A bad download** (not an RPM, such as an error page answered with 200; cut short;
  the wrong size, payload hash or signature): waits the same way, and after
  ``mirror.download_attempts`` bad attempts is dead-lettered with the last reason.
- **Not signed yet** (signatures required, and Koji holds no copy signed with a
  configured key): waits the same way, for as long as it takes.
- **Never possible** (a build Koji does not have, a request Koji refuses, a file the
  index already holds with other content, an RPM that cannot be read): rejected or
  dead-lettered at once, with the reason.
- **Anything else** is a bug: its traceback is logged and the command requeued, at
  once, so that the broker counts it (``x-delivery-count``); at the
  ``broker.delivery_limit``-th return it is dead-lettered with the error.

Nothing is lost, nothing retries in a hot loop for ever, and a dead-lettered command
records its build as failed with the reason (:mod:`services.mirror.deadletters`).
"""

from __future__ import annotations

import logging
import shutil
import signal
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from pika.adapters.blocking_connection import BlockingChannel

from schemas.messages import MirrorBuildV1
from schemas.topology import MIRROR_BUILD, MIRROR_WAIT
from services.common import architecture
from services.common.bus import (
    Consumer,
    DeadLetterHandler,
    Delivery,
    Publisher,
    Reject,
    connect,
    declare_wait_queue,
)
from services.common.data.mirror import MirrorData, PackageConflict
from services.common.rpm import RpmError
from services.mirror.deadletters import REASON_HEADER
from services.mirror.fetcher import BadDownload, Fetcher, NotSignedYet, UnknownBuild
from services.mirror.koji import KojiError, KojiUnavailable

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-retrace-mirror-attempt"
"""How many times a command waited in a wait queue (its next wait is longer)."""
BAD_DOWNLOADS_HEADER = "x-retrace-mirror-bad-downloads"
"""How many of its attempts ended with a bad download."""
DELIVERY_COUNT = "x-delivery-count"
"""How many times the broker had the command back (a quorum queue's count)."""


class KojiHealth:
    """When the worker last reached Koji and last found it unreachable, kept in the data
    (``mirror_cursors``) so that the ``serve`` process's ``/metrics`` can show it."""

    ANSWERED = "koji-answered"
    UNREACHABLE = "koji-unreachable"

    def __init__(self, data: MirrorData) -> None:
        self._data = data

    def answered(self) -> None:
        """Koji answered (whatever it said)."""
        self._data.set_cursor(self.ANSWERED, datetime.now(UTC))

    def unreachable(self) -> None:
        """Koji could not be reached, or failed on its side."""
        self._data.set_cursor(self.UNREACHABLE, datetime.now(UTC))

    def last(self) -> tuple[datetime | None, datetime | None]:
        """When Koji last answered, and when it last could not be reached."""
        return self._data.get_cursor(self.ANSWERED), self._data.get_cursor(self.UNREACHABLE)


def wait_queue(seconds: int) -> str:
    """The name of the wait queue that holds commands for ``seconds``."""
    return MIRROR_WAIT.queue_for(seconds)


def declare_wait_queues(channel: BlockingChannel, delays: tuple[int, ...]) -> None:
    """Declare the wait queues for ``delays`` (seconds); safe to repeat."""
    for seconds in delays:
        declare_wait_queue(channel, MIRROR_WAIT, seconds)


class WaitQueues:
    """Parks a command in the wait queue for its attempt number (``mirror.retry_delays``)."""

    def __init__(self, publisher: Publisher, delays: tuple[int, ...]) -> None:
        self._delays = delays
        self._publisher = publisher  # the process's one publishing connection

    def delay_for(self, attempt: int) -> int:
        """Seconds to wait before attempt ``attempt + 1``."""
        return self._delays[min(attempt, len(self._delays)) - 1]

    def later(self, command: MirrorBuildV1, attempt: int, bad_downloads: int = 0) -> int:
        """Send ``command`` to wait; return the seconds it waits."""
        seconds = self.delay_for(attempt)
        headers = {ATTEMPT_HEADER: attempt, BAD_DOWNLOADS_HEADER: bad_downloads}
        self._publisher.publish_later(MIRROR_WAIT, seconds, command, None, headers)
        return seconds

    def give_up(self, command: MirrorBuildV1, reason: str) -> None:
        """Dead-letter ``command`` with ``reason``: its build is recorded as failed."""
        self._publisher.dead_letter(MIRROR_BUILD, command, {REASON_HEADER: reason})


class MirrorHandler:
    """The consumer's handler: one command through the fetcher, failures sorted (see above)."""

    def __init__(
        self,
        fetcher: Fetcher,
        waits: WaitQueues,
        data: MirrorData,
        download_attempts: int,
        delivery_limit: int,
    ) -> None:
        self._fetcher = fetcher
        self._waits = waits
        self._koji = KojiHealth(data)
        self._download_attempts = download_attempts
        self._delivery_limit = delivery_limit

    def __call__(self, delivery: Delivery) -> None:
        command = delivery.message
        assert isinstance(command, MirrorBuildV1)
        attempt = int(delivery.headers.get(ATTEMPT_HEADER, 0)) + 1
        bad = int(delivery.headers.get(BAD_DOWNLOADS_HEADER, 0))
        try:
            self._fetcher.handle(command)
        except KojiUnavailable as exc:
            self._koji.unreachable()
            self._later(command, attempt, bad, exc)
            return
        except (UnknownBuild, KojiError) as exc:
            self._koji.answered()
            raise Reject(str(exc)) from exc
        except NotSignedYet as exc:
            self._later(command, attempt, bad, exc)
        except BadDownload as exc:
            bad += 1
            if bad >= self._download_attempts:
                self._give_up(command, f"{bad} attempts to download it were bad; the last: {exc}")
            else:
                self._later(command, attempt, bad, exc)
        except (PackageConflict, RpmError) as exc:
            # A file the index holds with other content (an import of a local rebuild),
            # or an RPM that matches Koji's record but cannot be read: no retry settles
            # that, a person must.
            self._give_up(command, str(exc))
        except Exception as exc:  # noqa: BLE001 -- logged, then requeued or dead-lettered
            self._unexpected(delivery, command, exc)
            return
        self._koji.answered()

    def _later(self, command: MirrorBuildV1, attempt: int, bad: int, error: Exception) -> None:
        # Parked on the broker, not requeued: a requeued failure would come straight back.
        seconds = self._waits.later(command, attempt, bad)
        log.warning(
            "build %s, attempt %d failed, retrying in %d s: %s",
            command.build,
            attempt,
            seconds,
            error,
        )

    def _give_up(self, command: MirrorBuildV1, reason: str) -> None:
        reason = f"Mirroring build {command.build} was given up: {reason}"
        self._waits.give_up(command, reason)
        log.error("%s (dead-lettered)", reason)

    def _unexpected(self, delivery: Delivery, command: MirrorBuildV1, error: Exception) -> None:
        """A bug, most likely: requeued, so that the broker counts the returns, until the
        delivery limit; then dead-lettered with the error."""
        returns = int(delivery.headers.get(DELIVERY_COUNT) or 0)
        if returns >= self._delivery_limit:
            log.error(
                "build %s failed unexpectedly on delivery %d, the last the delivery limit "
                "(%d returns) allows",
                command.build,
                returns + 1,
                self._delivery_limit,
                exc_info=error,
            )
            self._give_up(
                command, f"it failed unexpectedly on {returns + 1} deliveries; the last: {error!r}"
            )
            return
        log.error(
            "build %s failed unexpectedly on delivery %d of at most %d; requeued",
            command.build,
            returns + 1,
            self._delivery_limit + 1,
            exc_info=error,
        )
        raise error


def clean_incoming(repo: Path) -> None:
    """Remove downloads an interrupted worker left behind (they were never placed)."""
    shutil.rmtree(repo / ".incoming", ignore_errors=True)


def run_worker(
    url: str,
    heartbeat: int,
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
    # Mirror commands have one queue for every arch: the worker needs no arch of its own.
    consumer = Consumer(url, heartbeat, arches=(), role=architecture.MIRROR.bus)
    consumer.subscribe(MIRROR_BUILD, handler)
    consumer.subscribe_dead_letters([MIRROR_BUILD.dead_letter_queue_for()], dead_letters)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        consumer.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer.run()
