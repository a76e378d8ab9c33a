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
import queue
import random
import re
import threading
import time
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

from schemas.messages import SCHEMA_PACKAGE, Message, parse
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
    for spec in topology_queues(arches):
        channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
        for exchange, key in spec.bindings:
            channel.queue_bind(spec.name, exchange, routing_key=key)


def declare_queues(channel: BlockingChannel, arches: tuple[str, ...], names: list[str]) -> None:
    """Declare our exchanges and the queues called ``names``, with their bindings."""
    for exchange in EXCHANGES:
        channel.exchange_declare(exchange, exchange_type=ExchangeType("topic"), durable=True)
    for spec in topology_queues(arches):
        if spec.name in names:
            channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
            for exchange, key in spec.bindings:
                channel.queue_bind(spec.name, exchange, routing_key=key)


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


def properties_for(route: Route, message: Message) -> BasicProperties:
    """AMQP properties in fedora-messaging's wire format.

    The schema header is the model's stable ``schema_name`` (``retrace.task.finished.v1``),
    the name of its ``fedora.messages`` entry point; the package header tells a
    fedora-messaging consumer without our classes what to install; the ``rpm`` headers
    are the ones fedora-messaging sets from a message's ``packages``, for filtering.
    Our own consumers go by the queue, never by this header, so they take messages
    an older server sent with the old ``module:Class`` name alike.
    """
    headers: dict[str, Any] = {
        "fedora_messaging_schema": message.schema_name,
        "fedora_messaging_schema_package": SCHEMA_PACKAGE,
        "fedora_messaging_severity": SEVERITY_INFO,
        "sent-at": datetime.now(UTC).isoformat(),
    }
    for name in message.package_names():
        key = f"fedora_messaging_rpm_{name}"
        if len(key.encode()) <= 255:  # a header name is an AMQP short string
            headers[key] = True
    return BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        message_id=str(uuid.uuid4()),
        headers=headers,
    )


@dataclass(frozen=True)
class Role:
    """What one service sends and takes on our broker.

    Each service declares its role once (:mod:`services.common.architecture`, which
    also draws it for the README); a :class:`Publisher` or :class:`Consumer` given a
    role refuses any route outside it, so the declaration cannot fall behind the code.
    """

    publishes: tuple[Route, ...] = ()
    """Routes it publishes (and, for a command it gives up on, dead-letters itself)."""
    waits: tuple[WaitRoute, ...] = ()
    """Wait routes it parks messages in."""
    consumes: tuple[Route, ...] = ()
    """Routes whose queues it consumes: commands, and its subscriptions to events."""
    dead_letters: tuple[Route, ...] = ()
    """Command routes whose dead-letter queues it consumes."""


class UndeclaredRoute(ValueError):
    """A publisher or consumer was asked for a route its service's role does not name."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} is not in this service's role: declare it in services/common/architecture.py"
        )


Publish = Callable[[Route, Message, "str | None"], None]
"""What a service needs to send a message: :meth:`Publisher.publish` or a test's fake."""


class Publisher:
    """Publishes our messages with publisher confirms on one lazily opened connection.

    One per process: calls from several threads take turns (pika is not
    thread-safe).  A connection found lost is opened again, with short jittered
    pauses, ``ATTEMPTS`` times in all before :class:`PublishError`; the caller
    decides what a message the broker did not take means (a 503, a retry later).
    Given its service's :class:`Role`, it sends nothing the role does not name.
    """

    ATTEMPTS = 3
    PAUSE = 0.5

    def __init__(self, url: str, heartbeat: int = 60, role: Role | None = None) -> None:
        self._url = url
        self._heartbeat = heartbeat
        self._role = role
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._lock = threading.RLock()

    def _lost(self, attempt: int, exc: Exception) -> None:
        """Forget a lost connection; raise :class:`PublishError` after the last attempt."""
        self.close()
        if attempt == self.ATTEMPTS:
            raise PublishError(f"the broker is unreachable: {exc!r}") from exc
        time.sleep(self.PAUSE * attempt * random.uniform(0.5, 1.0))  # noqa: S311 -- jitter

    def _open(self) -> BlockingChannel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        self._connection = connect(self._url, self._heartbeat)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        return self._channel

    def _sends(self, route: Route) -> None:
        if self._role is not None and route not in self._role.publishes:
            raise UndeclaredRoute(f"publishing {route.topic}")

    def publish(self, route: Route, message: Message, arch: str | None = None) -> None:
        """Publish ``message`` on ``route``; raise :class:`PublishError` unless the broker took it.

        Commands are published ``mandatory``: no queue taking them is an error.
        One reconnect is tried if the connection had dropped since the last use.
        """
        if not isinstance(message, route.model):
            raise TypeError(f"{route.topic} carries {route.model.__name__}, not {type(message)}")
        self._sends(route)
        body = message.model_dump_json().encode()
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                with self._lock:
                    self._open().basic_publish(
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
                self._lost(attempt, exc)
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
        if self._role is not None and wait not in self._role.waits:
            raise UndeclaredRoute(f"parking in {wait.queue}")
        body = message.model_dump_json().encode()
        name = wait.queue_for(seconds, arch)
        props = properties_for(wait.route, message)
        props.headers = {**(props.headers or {}), **(headers or {})}
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                with self._lock:
                    channel = self._open()
                    declare_wait_queue(channel, wait, seconds, arch)
                    channel.basic_publish("", name, body, props, mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                raise PublishError(f"the broker refused to park a message in {name}") from exc
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._lost(attempt, exc)
                continue
            return

    def dead_letter(
        self,
        route: Route,
        message: Message,
        headers: dict[str, Any],
        arch: str | None = None,
    ) -> None:
        """Send the command ``message`` of ``route`` straight to its dead-letter queue,
        with ``headers`` added: what a handler does that gives up with a reason of its
        own (a rejection carries none).  Raises :class:`PublishError` unless the broker
        took it.
        """
        if not route.command or not isinstance(message, route.model):
            raise TypeError(f"{route.topic} has no dead letters of {type(message)}")
        self._sends(route)
        body = message.model_dump_json().encode()
        props = properties_for(route, message)
        props.headers = {**(props.headers or {}), **headers}
        key = route.topic_for(arch)
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                with self._lock:
                    self._open().basic_publish(
                        DEAD_LETTER_EXCHANGE, key, body, props, mandatory=True
                    )
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                raise PublishError(f"the broker refused to dead-letter {key}") from exc
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._lost(attempt, exc)
                continue
            return

    def close(self) -> None:
        """Close the connection, if open."""
        with self._lock:
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


Work = Callable[[BasicProperties, Basic.Deliver, bytes], None]
"""Handles one raw delivery: returning acks it, :class:`Reject` rejects it, any other
exception requeues it."""


class _Subscription:
    """Queues consumed together, their handler, and the one message it may be running."""

    def __init__(self, name: str, queues: list[str], work: Work) -> None:
        self.name = name
        self.queues = queues
        self.work = work
        self.busy = False
        # Quorum queues have no channel-wide prefetch: with one queue per arch, a
        # second message may arrive while one runs.  It waits here, unacked.
        self.waiting: deque[tuple[BasicProperties, Basic.Deliver, bytes]] = deque()


@dataclass(frozen=True)
class _Outcome:
    subscription: _Subscription
    generation: int
    tag: int
    error: BaseException | None


class Consumer:
    """The one consumer loop of a process: every queue it consumes, on one connection.

    Commands, dead letters and event subscriptions are each a subscription; each runs
    its handler in a thread of its own, one message at a time, while this thread
    keeps servicing the connection, so a job of many minutes never starves
    heartbeats.  A message is acked when its handler returns; a :class:`Reject`
    rejects it without requeue (to the dead-letter exchange, where a policy names
    one); any other exception requeues it for another attempt, here or elsewhere.

    Any loss of the connection or channel (the broker restarting, a connection
    closed by an operator, a network cut) is survived: the loop reconnects with a
    capped, jittered backoff, declares what it consumes again and goes on.  The
    broker requeues whatever was unacked on the lost connection; a handler still
    running then finishes, but its message is neither acked nor rejected (that
    delivery is gone), and the subscription takes its next message only after it.
    Nothing is acked that did not finish.  Given its service's :class:`Role`, it
    subscribes to nothing the role does not name.
    """

    BACKOFF_FIRST = 0.5
    BACKOFF_CAP = 30.0

    def __init__(
        self, url: str, heartbeat: int, arches: tuple[str, ...], role: Role | None = None
    ) -> None:
        self._url = url
        self._heartbeat = heartbeat
        self._arches = arches
        self._role = role
        self._stopping = threading.Event()
        self._subscriptions: list[_Subscription] = []
        self._outcomes: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()
        self._generation = 0
        self._declared = False
        self._channel: BlockingChannel | None = None
        self.connection: pika.BlockingConnection | None = None
        self.connected = threading.Event()
        """Set while the loop holds a connection (for tests and health checks)."""
        self.reconnects = 0
        """How many times the loop lost the broker and came back."""

    def subscribe(self, route: Route, handler: Handler) -> None:
        """Consume ``route``'s queues (one per configured arch), parsed into a :class:`Delivery`."""
        if self._role is not None and route not in self._role.consumes:
            raise UndeclaredRoute(f"consuming {route.topic}")
        # A queue without {arch} is one queue, however many arches are configured; a
        # consumer of such queues alone (the mirror's worker) is given no arch at all.
        per_arch = route.queue is not None and "{arch}" in route.queue
        if per_arch and not self._arches:
            raise ValueError(f"{route.topic} has a queue per arch, and this consumer has none")
        names = (
            [route.queue_for(arch) for arch in self._arches] if per_arch else [route.queue_for()]
        )

        def work(props: BasicProperties, method: Basic.Deliver, body: bytes) -> None:
            try:
                message = parse(route.model, body)
            except ValueError as exc:
                log.error("rejecting a malformed %s message: %s", route.topic, exc)
                raise Reject(f"it is malformed: {exc}") from exc
            handler(
                Delivery(
                    message, bool(method.redelivered), dict(props.headers or {}), props.message_id
                )
            )

        self._subscriptions.append(_Subscription(route.topic, names, work))

    def subscribe_dead_letters(
        self, queues: list[str], handler: DeadLetterHandler, retry_seconds: float = 5
    ) -> None:
        """Consume dead-letter ``queues`` with ``handler``; one that raises is retried later."""
        if self._role is not None:
            declared = {
                route.dead_letter_queue_for(arch)
                for route in self._role.dead_letters
                for arch in (self._arches if "{arch}" in (route.queue or "") else (None,))
            }
            for name in queues:
                if name not in declared:
                    raise UndeclaredRoute(f"consuming the dead letters of {name}")

        def work(props: BasicProperties, _method: Basic.Deliver, body: bytes) -> None:
            try:
                handler(body, dict(props.headers or {}))
            except Exception:
                log.exception("a dead-lettered message could not be handled; requeued")
                self._stopping.wait(retry_seconds)  # in the handler's thread, not the loop's
                raise

        self._subscriptions.append(_Subscription("dead letters", queues, work))

    def stop(self) -> None:
        """Ask the loop to finish the messages being handled and return."""
        self._stopping.set()

    def run(self) -> None:
        """Consume until :meth:`stop`, reconnecting whenever the broker goes away."""
        failures = 0
        while not self._stopping.is_set():
            try:
                self._consume(declare_all=not self._declared)
            except (pika.exceptions.AMQPError, OSError) as exc:
                # A connection that was up (a drop, not a broker refusing us) starts the
                # backoff again from the first pause; only failed attempts grow it.
                if self.connected.is_set():
                    failures = 0
                delay = min(self.BACKOFF_CAP, self.BACKOFF_FIRST * 2**failures)
                delay *= random.uniform(0.5, 1.0)  # noqa: S311 -- jitter, not secrecy
                failures += 1
                self.reconnects += 1
                log.warning("lost the broker (%r); reconnecting in %.1f s", exc, delay)
                self._stopping.wait(delay)
                continue
            finally:
                self._close()
            return
        self._drain_running()

    def _consume(self, *, declare_all: bool) -> None:
        self._generation += 1
        connection = self.connection = connect(self._url, self._heartbeat)
        channel = self._channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        names = [name for s in self._subscriptions for name in s.queues]
        if declare_all:
            declare_topology(channel, self._arches)
            self._declared = True
        else:
            declare_queues(channel, self._arches, names)
        for subscription in self._subscriptions:
            subscription.waiting.clear()  # their deliveries went back with the old channel
            for name in subscription.queues:
                channel.basic_consume(name, partial(self._arrived, subscription))
        self.connected.set()
        log.info("consuming %s", ", ".join(names))
        while not self._stopping.is_set() or any(s.busy for s in self._subscriptions):
            connection.process_data_events(time_limit=1)
            if not channel.is_open:
                raise pika.exceptions.ChannelClosed(0, "the channel closed")
            self._settle()

    def _arrived(
        self,
        subscription: _Subscription,
        _channel: BlockingChannel,
        method: Basic.Deliver,
        props: BasicProperties,
        body: bytes,
    ) -> None:
        if subscription.busy or self._stopping.is_set():
            subscription.waiting.append((props, method, body))
        else:
            self._start(subscription, props, method, body)

    def _start(
        self,
        subscription: _Subscription,
        props: BasicProperties,
        method: Basic.Deliver,
        body: bytes,
    ) -> None:
        tag = method.delivery_tag
        assert tag is not None
        generation, connection = self._generation, self.connection

        def work() -> None:
            error: BaseException | None = None
            try:
                subscription.work(props, method, body)
            except BaseException as exc:  # noqa: BLE001 -- handed back to the I/O thread
                error = exc
            self._outcomes.put(_Outcome(subscription, generation, tag, error))
            try:  # wake the loop at once; if that connection is gone, it polls anyway
                if connection is not None:
                    connection.add_callback_threadsafe(lambda: None)
            except (pika.exceptions.AMQPError, RuntimeError):
                pass

        subscription.busy = True
        threading.Thread(target=work, name=f"{subscription.name}-{tag}", daemon=True).start()

    def _settle(self) -> None:
        """Ack, reject or requeue what the handlers finished; start what waits."""
        while True:
            try:
                outcome = self._outcomes.get_nowait()
            except queue.Empty:
                break
            outcome.subscription.busy = False
            self._answer(outcome)
        for subscription in self._subscriptions:
            if not subscription.busy and subscription.waiting and not self._stopping.is_set():
                self._start(subscription, *subscription.waiting.popleft())

    def _answer(self, outcome: _Outcome) -> None:
        channel, name, error = self._channel, outcome.subscription.name, outcome.error
        if outcome.generation != self._generation or channel is None or not channel.is_open:
            log.warning(
                "the connection was lost while handling a %s message; the broker requeued it",
                name,
            )
        elif error is None:
            channel.basic_ack(outcome.tag)
        elif isinstance(error, Reject):
            log.error("rejecting a %s message: %s", name, error)
            channel.basic_reject(outcome.tag, requeue=False)
        else:
            log.error("handling a %s message failed, requeueing: %r", name, error)
            channel.basic_nack(outcome.tag, requeue=True)

    def _drain_running(self) -> None:
        """After the broker is gone for good: wait for running handlers, answer nothing."""
        while any(s.busy for s in self._subscriptions):
            try:
                outcome = self._outcomes.get(timeout=1)
            except queue.Empty:
                continue
            outcome.subscription.busy = False

    def _close(self) -> None:
        connection, self.connection, self._channel = self.connection, None, None
        self.connected.clear()
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError):
                log.debug("closing a broken connection", exc_info=True)
