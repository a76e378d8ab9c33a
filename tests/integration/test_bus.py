"""The broker plumbing against the real RabbitMQ."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from schemas.messages import AnalyzeTaskV1, TaskFinishedV1, parse
from schemas.topology import ANALYZE, DEAD_LETTER_EXCHANGE, EXCHANGE, TASK_FINISHED
from services.common.bus import (
    Consumer,
    Delivery,
    Publisher,
    PublishError,
    connect,
    declare_topology,
)
from tests.integration.broker import close_connections

pytestmark = pytest.mark.integration


def run_in_thread(target: Callable[[], None], timeout: float) -> list[BaseException]:
    """Run ``target`` in a thread; return what it raised (a lost connection, say)."""
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 -- reported to the test
            errors.append(exc)

    thread = threading.Thread(target=guarded)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the consumer did not stop"
    return errors


def queue_depth(url: str, queue: str) -> int:
    connection = connect(url)
    try:
        frame = connection.channel().queue_declare(queue, passive=True)
        count = frame.method.message_count
        assert count is not None
        return count
    finally:
        connection.close()


def test_declaring_the_topology_twice_is_harmless(broker_url: str) -> None:
    connection = connect(broker_url)
    channel = connection.channel()
    declare_topology(channel, ("x86_64",))
    declare_topology(channel, ("x86_64",))
    frame = channel.queue_declare(ANALYZE.queue_for("x86_64"), passive=True)
    assert frame.method.queue == "retrace.analyze.x86_64"
    connection.close()


def test_a_command_no_queue_takes_is_an_error_not_a_silent_loss(broker_url: str) -> None:
    connection = connect(broker_url)
    declare_topology(connection.channel(), ("x86_64",))
    connection.close()
    publisher = Publisher(broker_url)
    try:
        with pytest.raises(PublishError, match=r"no queue takes retrace\.analyze\.v1\.s390x"):
            publisher.publish(ANALYZE, AnalyzeTaskV1(task_id="task-s390x", arch="s390x"), "s390x")
        # An event without subscribers is normal.
        publisher.publish(
            TASK_FINISHED,
            TaskFinishedV1(task_id="task-event", arch="x86_64", outcome="failure"),  # type: ignore[arg-type]
        )
    finally:
        publisher.close()


def test_messages_carry_fedora_messaging_wire_headers(broker_url: str) -> None:
    connection = connect(broker_url)
    channel = connection.channel()
    declare_topology(channel, ("x86_64",))
    spy = channel.queue_declare("", exclusive=True).method.queue
    assert spy is not None
    channel.queue_bind(spy, EXCHANGE, routing_key=TASK_FINISHED.topic)
    publisher = Publisher(broker_url)
    event = TaskFinishedV1(task_id="task-wire01", arch="x86_64", outcome="success")  # type: ignore[arg-type]
    publisher.publish(TASK_FINISHED, event)
    publisher.close()
    method, props, body = None, None, None
    for _ in range(50):
        method, props, body = channel.basic_get(spy, auto_ack=True)
        if method is not None:
            break
        time.sleep(0.1)
    assert method is not None
    assert props is not None
    assert body is not None
    assert method.routing_key == "retrace.task.finished.v1"
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    assert props.message_id
    assert props.headers is not None
    assert props.headers["fedora_messaging_schema"] == "retrace.task.finished.v1"
    assert props.headers["fedora_messaging_severity"] == 20
    assert props.headers["sent-at"]
    assert parse(TaskFinishedV1, body).task_id == "task-wire01"
    connection.close()


def test_a_job_far_longer_than_the_heartbeat_is_acked_on_a_live_connection(
    broker_url: str,
) -> None:
    """With a 2 s heartbeat, a 10 s job acks and the connection survives."""
    publisher = Publisher(broker_url)
    connection = connect(broker_url)
    declare_topology(connection.channel(), ("x86_64",))
    connection.close()
    publisher.publish(ANALYZE, AnalyzeTaskV1(task_id="task-long01", arch="x86_64"), "x86_64")
    publisher.close()

    consumer = Consumer(broker_url, heartbeat=2, arches=("x86_64",))
    handled: list[Delivery] = []

    def slow_job(delivery: Delivery) -> None:
        time.sleep(10)
        handled.append(delivery)
        consumer.stop()

    consumer.subscribe(ANALYZE, slow_job)
    errors = run_in_thread(consumer.run, timeout=60)
    assert errors == []
    assert [d.message.task_id for d in handled] == ["task-long01"]  # type: ignore[attr-defined]
    assert not handled[0].redelivered
    # Acked, not requeued: the queue is empty, and the broker never dropped us.
    assert queue_depth(broker_url, ANALYZE.queue_for("x86_64")) == 0


def test_a_failed_job_is_requeued_and_a_malformed_body_is_not(broker_url: str) -> None:
    connection = connect(broker_url)
    channel = connection.channel()
    declare_topology(channel, ("x86_64",))
    channel.basic_publish(EXCHANGE, ANALYZE.topic_for("x86_64"), b'{"not": "a command"}')
    connection.close()
    publisher = Publisher(broker_url)
    publisher.publish(ANALYZE, AnalyzeTaskV1(task_id="task-flaky1", arch="x86_64"), "x86_64")
    publisher.close()

    consumer = Consumer(broker_url, heartbeat=5, arches=("x86_64",))
    attempts: list[bool] = []

    def flaky(delivery: Delivery) -> None:
        attempts.append(delivery.redelivered)
        if len(attempts) == 1:
            raise RuntimeError("transient")
        consumer.stop()

    consumer.subscribe(ANALYZE, flaky)
    assert run_in_thread(consumer.run, timeout=30) == []
    assert attempts == [False, True]
    assert queue_depth(broker_url, ANALYZE.queue_for("x86_64")) == 0


def test_the_consumer_survives_its_connections_being_closed_and_finishes_every_message(
    make_broker_url: Callable[[], str],
) -> None:
    """Every connection of the vhost is closed three times while commands flow and a
    dead letter waits: the loop reconnects by itself, every command is handled to the
    end and acked, and none is left."""
    url = make_broker_url()
    connection = connect(url)
    declare_topology(connection.channel(), ("x86_64",))
    channel = connection.channel()
    channel.basic_publish(DEAD_LETTER_EXCHANGE, ANALYZE.topic_for("x86_64"), b'{"dead": 1}')
    connection.close()
    publisher = Publisher(url)
    wanted = {f"task-drop{n:02d}" for n in range(6)}
    for task_id in sorted(wanted):
        publisher.publish(ANALYZE, AnalyzeTaskV1(task_id=task_id, arch="x86_64"), "x86_64")
    publisher.close()

    consumer = Consumer(url, heartbeat=5, arches=("x86_64",))
    finished: list[str] = []
    dead: list[bytes] = []

    def job(delivery: Delivery) -> None:
        time.sleep(0.4)
        finished.append(delivery.message.task_id)  # type: ignore[attr-defined]

    consumer.subscribe(ANALYZE, job)
    consumer.subscribe_dead_letters(
        [ANALYZE.dead_letter_queue_for("x86_64")], lambda body, _h: dead.append(body)
    )
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        for _ in range(3):
            assert consumer.connected.wait(30), "the consumer did not reconnect"
            time.sleep(0.6)
            assert close_connections(url) >= 1
        deadline = time.monotonic() + 60
        while not wanted <= set(finished) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert wanted <= set(finished), finished
        # The last close may not have reached the consumer yet: wait until it has.
        deadline = time.monotonic() + 30
        while consumer.reconnects < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert consumer.reconnects >= 3
        assert consumer.connected.wait(30)
        assert dead == [b'{"dead": 1}']
        for _ in range(50):  # the last ack may still be on its way
            if queue_depth(url, ANALYZE.queue_for("x86_64")) == 0:
                break
            time.sleep(0.1)
        assert queue_depth(url, ANALYZE.queue_for("x86_64")) == 0
        assert queue_depth(url, ANALYZE.dead_letter_queue_for("x86_64")) == 0
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_a_publisher_recovers_when_its_connection_was_closed(
    make_broker_url: Callable[[], str],
) -> None:
    url = make_broker_url()
    connection = connect(url)
    declare_topology(connection.channel(), ("x86_64",))
    connection.close()
    publisher = Publisher(url)
    try:
        publisher.publish(ANALYZE, AnalyzeTaskV1(task_id="task-pub001", arch="x86_64"), "x86_64")
        assert close_connections(url) == 1
        publisher.publish(ANALYZE, AnalyzeTaskV1(task_id="task-pub002", arch="x86_64"), "x86_64")
    finally:
        publisher.close()
    assert queue_depth(url, ANALYZE.queue_for("x86_64")) == 2
