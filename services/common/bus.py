"""RabbitMQ plumbing with pika: topology, publishing, and a consumer loop.

Wire format is fedora-messaging's (JSON body, ``content_type=application/json``,
persistent delivery, a ``message_id`` and the ``fedora_messaging_schema``,
``fedora_messaging_severity`` and ``sent-at`` headers), so fedora-messaging tools can
read our events, but our services never import fedora_messaging.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.exchange_type import ExchangeType
from pika.spec import Basic, BasicProperties

from schemas.messages import Message, parse
from schemas.topology import (
    COMMAND_POLICY,
    DEAD_LETTER_EXCHANGE,
    EXCHANGE,
    MIRROR_WAIT,
    ROUTES,
    SUBSCRIPTION_POLICY,
    SUBSCRIPTIONS,
    Route,
    WaitRoute,
)

log = logging.getLogger(__name__)

# fedora-messaging's severity levels; ours are informational.
SEVERITY_INFO = 20


class PublishError(Exception):
    """The broker did not take a message: unreachable, refused, or unroutable."""


def connect(url: str, heartbeat: int | None = None) -> pika.BlockingConnection:
    """A blocking connection to ``url``; ``heartbeat`` (seconds) overrides the URL's."""
    params = pika.URLParameters(url)
    if heartbeat is not None:
        params.heartbeat = heartbeat
    params.connection_attempts = 1
    params.blocked_connection_timeout = 30
    return pika.BlockingConnection(params)


@dataclass(frozen=True)
class QueueSpec:
    """One queue of our topology, with its never-changing arguments and its bindings."""

    name: str
    arguments: dict[str, Any]
    bindings: tuple[tuple[str, str], ...]  # (exchange, routing key)


EXCHANGES = (EXCHANGE, DEAD_LETTER_EXCHANGE)
"""Our exchanges, both durable topic exchanges."""


def topology_queues(arches: tuple[str, ...]) -> list[QueueSpec]:
    """Every quorum queue of ours for ``arches``: commands, their dead letters, subscriptions.

    Only arguments that can never change belong here (the queue type).  Delivery
    limits and dead-lettering are policies, applied by ``retrace-admin``.
    """
    quorum = {"x-queue-type": "quorum"}
    queues = []
    for route in ROUTES:
        if route.queue is None:
            continue
        for arch in arches if "{arch}" in route.queue else (None,):
            key = route.topic_for(arch)
            queues.append(QueueSpec(route.queue_for(arch), quorum, ((EXCHANGE, key),)))
            if route.command:
                dead = route.dead_letter_queue_for(arch)
                queues.append(QueueSpec(dead, quorum, ((DEAD_LETTER_EXCHANGE, key),)))
    for subscription in SUBSCRIPTIONS:
        queues.append(
            QueueSpec(subscription.queue_for(), quorum, ((EXCHANGE, subscription.topic_for()),))
        )
    return queues


def declare_topology(channel: BlockingChannel, arches: tuple[str, ...]) -> None:
    """Declare our exchanges, quorum queues and bindings; safe to call any number of times."""
    for exchange in EXCHANGES:
        channel.exchange_declare(exchange, exchange_type=ExchangeType("topic"), durable=True)
    for queue in topology_queues(arches):
        channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
        for exchange, key in queue.bindings:
            channel.queue_bind(queue.name, exchange, routing_key=key)


def declare_wait_queue(
    channel: BlockingChannel, wait: WaitRoute, seconds: int, arch: str | None = None
) -> str:
    """Declare the queue where ``wait.route``'s messages wait ``seconds``; return its name.

    Safe to repeat; the queue's arguments are :meth:`WaitRoute.arguments`.
    """
    queue = wait.queue_for(seconds, arch)
    channel.queue_declare(queue, durable=True, arguments=wait.arguments(seconds, arch))
    return queue


# -- policies: delivery limit and dead-lettering, through the management HTTP API --

MANAGEMENT_TIMEOUT = 10


class PolicyError(Exception):
    """The management API could not be reached or refused the policy."""


def _queue_pattern(routes: list[Route]) -> str:
    """A regular expression matching the queues of ``routes`` (any arch), and nothing else."""
    any_arch = re.escape("{arch}")
    names = [
        re.escape(route.queue).replace(any_arch, r"[^.]+")
        for route in routes
        if route.queue is not None
    ]
    return "^(" + "|".join(names) + ")$"


def command_queue_pattern() -> str:
    """A regular expression matching every command queue of ours, and nothing else."""
    return _queue_pattern([route for route in ROUTES if route.command])


def subscription_queue_pattern() -> str:
    """A regular expression matching every event subscription queue of ours."""
    return _queue_pattern(list(SUBSCRIPTIONS))


def subscription_policy(max_length: int) -> dict[str, Any]:
    """The policy body: a subscription queue keeps its newest ``max_length`` events.

    An event only hastens what happens anyway (a build-synced event wakes tasks
    that their wait queue's TTL would wake later), so when no one reads them for
    long, dropping the oldest is better than filling the broker's disk.
    """
    return {
        "pattern": subscription_queue_pattern(),
        "apply-to": "queues",
        "priority": 0,
        "definition": {"max-length": max_length, "overflow": "drop-head"},
    }


def our_policies(delivery_limit: int, subscription_max_length: int) -> dict[str, dict[str, Any]]:
    """Every policy of ours by name."""
    return {
        COMMAND_POLICY: command_policy(delivery_limit),
        SUBSCRIPTION_POLICY: subscription_policy(subscription_max_length),
    }


def command_policy(delivery_limit: int) -> dict[str, Any]:
    """The policy body: after ``delivery_limit`` returns a command goes to the dead letters.

    ``at-least-once`` dead-lettering keeps a message until the dead-letter queue
    confirms it, and needs ``reject-publish`` overflow.
    """
    return {
        "pattern": command_queue_pattern(),
        "apply-to": "queues",
        "priority": 0,
        "definition": {
            "delivery-limit": delivery_limit,
            "dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        },
    }


def _management_request(
    management_url: str,
    broker_url: str,
    method: str,
    name: str,
    body: dict[str, Any] | None = None,
) -> Any:
    params = pika.URLParameters(broker_url)
    vhost = urllib.parse.quote(params.virtual_host, safe="")
    url = f"{management_url.rstrip('/')}/api/policies/{vhost}/{name}"
    credentials = params.credentials
    user = getattr(credentials, "username", "guest")
    password = getattr(credentials, "password", "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 -- the operator's own management URL
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=MANAGEMENT_TIMEOUT) as answer:  # noqa: S310
            text = answer.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and method == "GET":
            return None
        raise PolicyError(f"{method} {url}: {exc.code} {exc.reason}") from exc
    except OSError as exc:
        raise PolicyError(f"the management API at {management_url} is unreachable: {exc}") from exc
    return json.loads(text) if text.strip() else {}


def apply_policies(
    management_url: str, broker_url: str, delivery_limit: int, subscription_max_length: int
) -> dict[str, dict[str, Any]]:
    """Set our policies on ``broker_url``'s vhost; return them by name."""
    policies = our_policies(delivery_limit, subscription_max_length)
    for name, policy in policies.items():
        _management_request(management_url, broker_url, "PUT", name, policy)
    return policies


def topology_definitions(
    arches: tuple[str, ...],
    vhost: str,
    delivery_limit: int,
    subscription_max_length: int,
    wait_delays: tuple[int, ...] = (),
) -> dict[str, Any]:
    """The whole topology as a RabbitMQ definitions file (``rabbitmqctl import_definitions``).

    Exchanges, queues and bindings come from :func:`topology_queues`, the policies from
    :func:`our_policies`, the mirror's wait queues (for ``wait_delays`` seconds)
    from :meth:`schemas.topology.WaitRoute.arguments`: what the services declare
    and ``retrace-admin policies`` applies, spelled nowhere else.
    """
    queues = topology_queues(arches)
    waits = [QueueSpec(MIRROR_WAIT.queue_for(s), MIRROR_WAIT.arguments(s), ()) for s in wait_delays]
    policies = our_policies(delivery_limit, subscription_max_length)
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {
                "name": name,
                "vhost": vhost,
                "type": "topic",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for name in EXCHANGES
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": q.arguments,
            }
            for q in [*queues, *waits]
        ],
        "bindings": [
            {
                "source": exchange,
                "vhost": vhost,
                "destination": q.name,
                "destination_type": "queue",
                "routing_key": key,
                "arguments": {},
            }
            for q in queues
            for exchange, key in q.bindings
        ],
        "policies": [{"vhost": vhost, "name": name, **body} for name, body in policies.items()],
    }


def policy_problem(management_url: str, broker_url: str) -> str | None:
    """Why our queues lack their policies, or ``None`` if they have them."""
    try:
        commands = _management_request(management_url, broker_url, "GET", COMMAND_POLICY)
        subscriptions = _management_request(management_url, broker_url, "GET", SUBSCRIPTION_POLICY)
    except PolicyError as exc:
        return f"cannot check the broker's policies: {exc}"
    if commands is None:
        return (
            f"the broker has no '{COMMAND_POLICY}' policy: commands that keep failing are "
            "never dead-lettered; run 'retrace-admin policies'"
        )
    definition = commands.get("definition", {})
    wanted = command_policy(1)["definition"]
    differing = sorted(
        k for k in wanted if k != "delivery-limit" and definition.get(k) != wanted[k]
    )
    if "delivery-limit" not in definition or differing:
        return (
            f"the '{COMMAND_POLICY}' policy differs from ours ({differing or 'no delivery-limit'})"
        )
    if subscriptions is None or "max-length" not in subscriptions.get("definition", {}):
        return (
            f"the broker has no '{SUBSCRIPTION_POLICY}' policy: events pile up while no one "
            "reads them; run 'retrace-admin policies'"
        )
    return None


# -- dead letters: what the broker gave up on, and why --


def death_reason(headers: Mapping[str, Any], why: Mapping[str, str], otherwise: str) -> str:
    """One plain sentence from a dead-lettered message's ``x-death`` header.

    ``why`` words each RabbitMQ reason (``delivery_limit``, ``rejected``, ``expired``,
    ``maxlen``) for the kind of command at hand; ``otherwise`` words any other.
    """
    deaths = headers.get("x-death") or []
    first = deaths[-1] if deaths else {}  # the newest death is first; the original, last
    reason = str(headers.get("x-first-death-reason") or first.get("reason") or "unknown")
    queue = str(headers.get("x-first-death-queue") or first.get("queue") or "?")
    text = why.get(reason, otherwise)
    count = headers.get("x-delivery-count")
    attempts = f" after {count} returns" if count is not None else ""
    return f"{text[:1].upper()}{text[1:]} (RabbitMQ: {reason} on {queue}{attempts})."


DeadLetterHandler = Callable[[bytes, dict[str, Any]], None]
"""Handles one dead-lettered body with its headers; raising requeues it for a later try."""


class DeadLetterConsumer:
    """Consumes dead-letter queues in a thread of its own, reconnecting when the broker goes."""

    RETRY_SECONDS = 5

    def __init__(
        self,
        url: str,
        heartbeat: int,
        arches: tuple[str, ...],
        queues: list[str],
        handler: DeadLetterHandler,
    ) -> None:
        self._url = url
        self._heartbeat = heartbeat
        self._arches = arches
        self._queues = queues
        self._handler = handler
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dead-letters", daemon=True)

    def start(self) -> None:
        """Start consuming in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop consuming and wait for the thread."""
        self._stopping.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._consume()
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.error("dead-letter consumer lost the broker, retrying: %r", exc)
                self._stopping.wait(self.RETRY_SECONDS)

    def _consume(self) -> None:
        connection = connect(self._url, self._heartbeat)
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=1)
            declare_topology(channel, self._arches)

            def on_message(
                ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
            ) -> None:
                tag = method.delivery_tag
                assert tag is not None
                try:
                    self._handler(body, dict(props.headers or {}))
                except Exception:
                    log.exception("a dead-lettered command could not be handled; requeued")
                    ch.basic_nack(tag, requeue=True)
                    self._stopping.wait(self.RETRY_SECONDS)
                    return
                ch.basic_ack(tag)

            for queue in self._queues:
                channel.basic_consume(queue, on_message)
            log.info("consuming dead letters from %s", ", ".join(self._queues))
            while channel.is_open and not self._stopping.is_set():
                connection.process_data_events(time_limit=1)
        finally:
            if connection.is_open:
                connection.close()


def properties_for(route: Route, message: Message) -> BasicProperties:
    """AMQP properties in fedora-messaging's wire format."""
    return BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        message_id=str(uuid.uuid4()),
        headers={
            "fedora_messaging_schema": f"{type(message).__module__}:{type(message).__name__}",
            "fedora_messaging_severity": SEVERITY_INFO,
            "sent-at": datetime.now(UTC).isoformat(),
        },
    )


Publish = Callable[[Route, Message, "str | None"], None]
"""What a service needs to send a message: :meth:`Publisher.publish` or a test's fake."""


class Publisher:
    """Publishes our messages with publisher confirms on one lazily opened connection.

    Not thread-safe (pika is not): give each thread or worker process its own.
    """

    def __init__(self, url: str, heartbeat: int = 60) -> None:
        self._url = url
        self._heartbeat = heartbeat
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def _open(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        self._connection = connect(self._url, self._heartbeat)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        return self._channel

    def publish(self, route: Route, message: Message, arch: str | None = None) -> None:
        """Publish ``message`` on ``route``; raise :class:`PublishError` unless the broker took it.

        Commands are published ``mandatory``: no queue taking them is an error.
        One reconnect is tried if the connection had dropped since the last use.
        """
        if not isinstance(message, route.model):
            raise TypeError(f"{route.topic} carries {route.model.__name__}, not {type(message)}")
        body = message.model_dump_json().encode()
        for attempt in (1, 2):
            try:
                channel = self._open()
                channel.basic_publish(
                    EXCHANGE,
                    route.topic_for(arch),
                    body,
                    properties_for(route, message),
                    mandatory=route.command,
                )
            except pika.exceptions.UnroutableError as exc:
                raise PublishError(
                    f"no queue takes {route.topic_for(arch)}: is an analyzer for it configured "
                    "and the topology declared ('retrace-admin topology')?"
                ) from exc
            except pika.exceptions.NackError as exc:
                raise PublishError(f"the broker refused {route.topic_for(arch)}") from exc
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.close()
                if attempt == 2:
                    raise PublishError(f"the broker is unreachable: {exc!r}") from exc
                continue
            return

    def publish_later(
        self,
        wait: WaitRoute,
        seconds: int,
        message: Message,
        arch: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Park ``message`` for ``seconds`` in a wait queue, after which the broker
        publishes it on ``wait.route`` (see :class:`~schemas.topology.WaitRoute`), with
        ``headers`` added to the usual ones (a retry count, say).

        Raises :class:`PublishError` unless the broker took it.
        """
        if not isinstance(message, wait.route.model):
            raise TypeError(f"{wait.queue} holds {wait.route.model.__name__}, not {type(message)}")
        body = message.model_dump_json().encode()
        queue = wait.queue_for(seconds, arch)
        for attempt in (1, 2):
            try:
                channel = self._open()
                declare_wait_queue(channel, wait, seconds, arch)
                props = properties_for(wait.route, message)
                props.headers = {**(props.headers or {}), **(headers or {})}
                channel.basic_publish("", queue, body, props, mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                raise PublishError(f"the broker refused to park a message in {queue}") from exc
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.close()
                if attempt == 2:
                    raise PublishError(f"the broker is unreachable: {exc!r}") from exc
                continue
            return

    def close(self) -> None:
        """Close the connection, if open."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                log.debug("closing a broken connection", exc_info=True)


Later = Callable[[WaitRoute, int, Message, "str | None"], None]
"""What a service needs to park a message: :meth:`Publisher.publish_later` or a fake."""


@dataclass(frozen=True)
class Delivery:
    """One received message, parsed."""

    message: Message
    redelivered: bool
    headers: dict[str, Any]
    message_id: str | None = None
    """The producer's id: kept by redeliveries and dead-lettering, new for each publish."""


class Reject(Exception):
    """Raised by a handler: the message cannot ever be handled; do not requeue it."""


Handler = Callable[[Delivery], None]


class Consumer:
    """Consumes one route's queues, one message at a time, keeping heartbeats alive.

    The handler runs in a worker thread while this thread keeps servicing the
    connection, so a job of many minutes never starves heartbeats; the worker hands
    its outcome back with ``add_callback_threadsafe``.  The message is acked when the
    handler returns; a :class:`Reject` rejects it without requeue (to the dead-letter
    exchange, where a policy names one); any other exception requeues it for another
    attempt, here or on another consumer.
    """

    def __init__(self, url: str, heartbeat: int, arches: tuple[str, ...]) -> None:
        self._url = url
        self._heartbeat = heartbeat
        self._arches = arches
        self._stopping = threading.Event()
        self._busy = False
        # Quorum queues have no channel-wide prefetch: with one queue per arch, a
        # second message may arrive while one runs.  It waits here, unacked.
        self._waiting: deque[Callable[[], None]] = deque()
        self.connection: pika.BlockingConnection | None = None

    def stop(self) -> None:
        """Ask the loop to finish the current message and return."""
        self._stopping.set()

    def run(self, route: Route, handler: Handler) -> None:
        """Consume ``route``'s queues (one per configured arch) until :meth:`stop`.

        Messages received but not started when it stops are requeued by the broker.
        """
        connection = self.connection = connect(self._url, self._heartbeat)
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        declare_topology(channel, self._arches)
        # A queue without {arch} is one queue, however many arches are configured.
        names = list(dict.fromkeys(route.queue_for(arch) for arch in self._arches))

        def on_message(
            ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
        ) -> None:
            start = partial(self._start, connection, ch, method, props, body, route, handler)
            if self._busy:
                self._waiting.append(start)
            else:
                start()

        for name in names:
            channel.basic_consume(name, on_message)
        log.info("consuming %s", ", ".join(names))
        try:
            while channel.is_open and (self._busy or not self._stopping.is_set()):
                connection.process_data_events(time_limit=1)
                while not self._busy and self._waiting and not self._stopping.is_set():
                    self._waiting.popleft()()
        finally:
            self._waiting.clear()
            if connection.is_open:
                connection.close()

    def _start(
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        method: Basic.Deliver,
        props: BasicProperties,
        body: bytes,
        route: Route,
        handler: Handler,
    ) -> None:
        tag = method.delivery_tag
        assert tag is not None
        try:
            message = parse(route.model, body)
        except ValueError as exc:
            log.error("rejecting a malformed %s message: %s", route.topic, exc)
            channel.basic_reject(tag, requeue=False)
            return
        delivery = Delivery(
            message, bool(method.redelivered), dict(props.headers or {}), props.message_id
        )

        def work() -> None:
            error: BaseException | None = None
            try:
                handler(delivery)
            except BaseException as exc:  # noqa: BLE001 -- handed back to the I/O thread
                error = exc
            connection.add_callback_threadsafe(lambda: self._finish(channel, tag, route, error))

        self._busy = True
        threading.Thread(target=work, name=f"handler-{tag}", daemon=True).start()

    def _finish(
        self, channel: BlockingChannel, tag: int, route: Route, error: BaseException | None
    ) -> None:
        self._busy = False
        if not channel.is_open:
            log.error("the channel closed while handling a message; the broker requeues it")
        elif error is None:
            channel.basic_ack(tag)
        elif isinstance(error, Reject):
            log.error("rejecting %s: %s", route.topic, error)
            channel.basic_reject(tag, requeue=False)
        else:
            log.error("handling %s failed, requeueing: %r", route.topic, error)
            channel.basic_nack(tag, requeue=True)
