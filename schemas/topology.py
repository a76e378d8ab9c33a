"""The one table of exchanges, topics and queues.

The topology code, the services and the deployment files all read this module;
nothing else spells an exchange name, a routing key or a queue name.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.messages import AnalyzeTaskV1, BuildSyncedV1, Message, MirrorBuildV1, TaskFinishedV1

EXCHANGE = "retrace"
"""The topic exchange every command and event of ours is published to."""

DEAD_LETTER_EXCHANGE = "retrace.dead-letter"
"""Where a command queue's policy sends what it gives up on (same routing keys)."""

COMMAND_POLICY = "retrace-commands"
"""The RabbitMQ policy giving every command queue its delivery limit and dead-lettering."""
SUBSCRIPTION_POLICY = "retrace-subscriptions"
"""The RabbitMQ policy bounding our event subscription queues: beyond it the oldest go."""


@dataclass(frozen=True)
class Route:
    """Where one kind of message goes.

    ``topic`` and ``queue`` may hold ``{arch}``: commands for analyzers are routed
    per architecture, so each analyzer takes only the arches it can retrace.
    ``command`` routes are published with ``mandatory=True``: a command that no
    queue takes is an error, while an event without subscribers is normal.
    """

    model: type[Message]
    topic: str
    queue: str | None
    command: bool

    def topic_for(self, arch: str | None = None) -> str:
        """The routing key, with ``{arch}`` filled in where the route has one."""
        return self.topic.format(arch=arch) if "{arch}" in self.topic else self.topic

    def dead_letter_queue_for(self, arch: str | None = None) -> str:
        """The queue holding this route's dead-lettered commands."""
        return "retrace.dead-letter." + self.queue_for(arch).removeprefix("retrace.")

    def queue_for(self, arch: str | None = None) -> str:
        """The queue name, with ``{arch}`` filled in where the route has one."""
        if self.queue is None:
            raise ValueError(f"{self.topic} is an event: it has no queue of ours")
        return self.queue.format(arch=arch) if "{arch}" in self.queue else self.queue


ANALYZE = Route(
    model=AnalyzeTaskV1,
    topic="retrace.analyze.v1.{arch}",
    queue="retrace.analyze.{arch}",
    command=True,
)
TASK_FINISHED = Route(
    model=TaskFinishedV1,
    topic="retrace.task.finished.v1",
    queue=None,
    command=False,
)

MIRROR_BUILD = Route(
    model=MirrorBuildV1,
    topic="retrace.mirror.build.v1",
    queue="retrace.mirror.build",
    command=True,
)
BUILD_SYNCED = Route(
    model=BuildSyncedV1,
    topic="retrace.mirror.build.synced.v1",
    queue=None,
    command=False,
)

ROUTES: tuple[Route, ...] = (ANALYZE, TASK_FINISHED, MIRROR_BUILD, BUILD_SYNCED)

ANALYZER_BUILD_SYNCED = Route(
    model=BuildSyncedV1,
    topic=BUILD_SYNCED.topic,
    queue="retrace.analyzer.build-synced",
    command=False,
)
"""The analyzers' own copy of every build-synced event: it wakes tasks waiting for a build."""

SUBSCRIPTIONS: tuple[Route, ...] = (ANALYZER_BUILD_SYNCED,)
"""Queues through which one of our services subscribes to an event of :data:`ROUTES`."""


@dataclass(frozen=True)
class WaitRoute:
    """Where a route's messages wait before the broker hands them back to it.

    Each queue holds its messages for its time (``{seconds}`` in the name), then
    dead-letters them to :data:`EXCHANGE` under the route's topic: a retry after a
    delay that survives restarts and never loops hot.
    """

    route: Route
    queue: str

    def queue_for(self, seconds: int, arch: str | None = None) -> str:
        """The wait queue holding messages for ``seconds`` (for ``arch``, where routed so)."""
        return self.queue.format(seconds=seconds, arch=arch)

    def arguments(self, seconds: int, arch: str | None = None) -> dict[str, object]:
        """The wait queue's arguments: its TTL, then back to the route's topic.

        Arguments, not policies, on purpose: they are what the queue *is*; a
        different delay is a different queue.
        """
        return {
            "x-message-ttl": seconds * 1000,
            "x-dead-letter-exchange": EXCHANGE,
            "x-dead-letter-routing-key": self.route.topic_for(arch),
        }


ANALYZE_WAIT = WaitRoute(ANALYZE, "retrace.analyze.{arch}.wait.{seconds}s")
"""Where an analyze command waits for the mirror to fetch its crashed build
(``analyzer.fetch_wait_seconds``)."""

MIRROR_WAIT_QUEUE = "retrace.mirror.build.wait.{seconds}s"
"""Where a mirror command waits out a Koji outage for ``seconds`` (``mirror.retry_delays``).

Each such queue holds its messages for its time, then dead-letters them back to
:data:`EXCHANGE` under :data:`MIRROR_BUILD`'s topic: a retry with backoff that
survives a restart of the worker and never hot-loops.
"""

MIRROR_WAIT = WaitRoute(MIRROR_BUILD, MIRROR_WAIT_QUEUE)
"""The same wait queues as a :class:`WaitRoute`, for the shared helpers of the bus."""

WAITS: tuple[WaitRoute, ...] = (ANALYZE_WAIT, MIRROR_WAIT)
"""Every wait route of ours."""

KOJI_BUILD_TOPIC = "buildsys.build.state.change"
"""Koji's build messages, on the broker that carries Koji's (under its topic prefix):
the mirror's listener turns them into :data:`MIRROR_BUILD` commands."""


def koji_topic(prefix: str, topic: str = KOJI_BUILD_TOPIC) -> str:
    """The wire topic of Koji's ``topic`` under ``prefix`` (``org.fedoraproject.prod``)."""
    return f"{prefix}.{topic}" if prefix else topic
