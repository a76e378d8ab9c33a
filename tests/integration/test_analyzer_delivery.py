"""Delivery: dead analyzers, duplicates, poison and malformed commands, two analyzers.

The analyzer's gdb is wrapped to take two seconds longer, so that a test can act
while a retrace runs; everything else is the real system.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from schemas.messages import AnalyzeTaskV1, TaskFinishedV1, parse
from schemas.topology import ANALYZE, EXCHANGE, TASK_FINISHED
from services.common import progress
from services.common.bus import Publisher, connect, properties_for
from services.common.store import TaskStatus
from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack
from tests.integration.test_analyzer import Analyzer

pytestmark = pytest.mark.integration


class SlowStack(Stack):
    """A stack whose gdb starts two seconds late."""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "RETRACE_ANALYZER__GDB": str(self.home / "bin" / "gdb")}


class Events:
    """Every task.finished event published while the module runs."""

    def __init__(self, broker_url: str) -> None:
        self.connection = connect(broker_url)
        self.channel = self.connection.channel()
        queue = self.channel.queue_declare("", exclusive=True).method.queue
        assert queue is not None
        self.queue = queue
        self.channel.queue_bind(queue, EXCHANGE, routing_key=TASK_FINISHED.topic)
        self.seen: list[TaskFinishedV1] = []

    def drain(self) -> Counter[str]:
        while True:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None or body is None:
                break
            self.seen.append(parse(TaskFinishedV1, body))
        return Counter(event.task_id for event in self.seen)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
) -> Iterator[SlowStack]:
    home = tmp_path_factory.mktemp("delivery")
    wrapper = home / "bin" / "gdb"
    wrapper.parent.mkdir()
    wrapper.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && exec gdb --version\nsleep 2\nexec gdb "$@"\n'
    )
    wrapper.chmod(0o755)
    stack = SlowStack(home, make_broker_url())
    stack.write_settings()
    applied = stack.command("retrace-admin", "policies")
    assert applied.returncode == 0, applied.stderr
    stack.up()
    imported = stack.command(
        "retrace-mirror", "import", *[str(r.path) for r in crash_fixtures.rpms]
    )
    assert imported.returncode == 0, imported.stderr
    yield stack
    stack.down()


@pytest.fixture(scope="module")
def analyzer(stack: SlowStack) -> Analyzer:
    return Analyzer(stack)


@pytest.fixture(scope="module")
def events(stack: SlowStack) -> Iterator[Events]:
    events = Events(stack.broker_url)
    yield events
    events.connection.close()


def analyzers(stack: Stack) -> list[int]:
    return [
        p.pid for p in stack.processes if "retrace-analyzer" in str(p.args) and p.poll() is None
    ]


def test_a_poison_command_is_dead_lettered_and_its_task_failed(
    stack: SlowStack, analyzer: Analyzer, events: Events
) -> None:
    # Its crash directory is gone: every attempt fails, the command returns each time.
    task_id = "poison-command"
    analyzer.store.create_task(task_id, "x", "x86_64", "retrace", progress.QUEUED)
    assert analyzer.store.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
    (analyzer.spool / task_id).mkdir(parents=True)
    publisher = Publisher(stack.broker_url)
    publisher.publish(ANALYZE, AnalyzeTaskV1(task_id=task_id, arch="x86_64"), "x86_64")
    publisher.close()
    assert analyzer.wait(task_id, timeout=60) == TaskStatus.FAILURE
    task = analyzer.store.get_task(task_id)
    assert task is not None
    assert task.reason is not None
    assert "delivery_limit on retrace.analyze.x86_64" in task.reason
    assert "delivery_limit" in analyzer.reason(task_id)
    assert analyzers(stack), stack.logs()  # the analyzer itself survived
    assert events.drain()[task_id] == 1


def test_a_malformed_command_is_dead_lettered_at_once(
    stack: SlowStack, analyzer: Analyzer, events: Events
) -> None:
    task_id = "malformed-command"
    analyzer.store.create_task(task_id, "x", "x86_64", "retrace", progress.QUEUED)
    assert analyzer.store.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
    connection = connect(stack.broker_url)
    channel = connection.channel()
    body = b'{"task_id": "malformed-command", "arch": 86, "task_type": "no such type"}'
    props = properties_for(ANALYZE, AnalyzeTaskV1(task_id=task_id, arch="x86_64"))
    channel.basic_publish(EXCHANGE, ANALYZE.topic_for("x86_64"), body, props, mandatory=True)
    connection.close()
    assert analyzer.wait(task_id, timeout=30) == TaskStatus.FAILURE
    assert "refused as unreadable (RabbitMQ: rejected" in analyzer.reason(task_id)
    assert events.drain()[task_id] == 1


def test_a_task_whose_analyzer_is_killed_is_finished_by_another_once(
    stack: SlowStack, analyzer: Analyzer, events: Events, crash_fixtures: Fixtures
) -> None:
    task_id = analyzer.inject(crash_fixtures.crash.problem_dir, "killed-analyzer")
    deadline = time.monotonic() + 60
    while (task := analyzer.store.get_task(task_id)) and task.progress != progress.BACKTRACE:
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)
    (victim,) = [p for p in stack.processes if p.pid in analyzers(stack)]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stack.start("retrace-analyzer", "run")
    stack.start("retrace-analyzer", "run")
    assert analyzer.wait(task_id, timeout=90) == TaskStatus.SUCCESS, stack.logs()
    time.sleep(1)
    assert events.drain()[task_id] == 1
    assert "Generating backtrace" in analyzer.result(task_id, "log")


def test_a_command_delivered_twice_while_running_gives_one_result(
    stack: SlowStack, analyzer: Analyzer, events: Events, crash_fixtures: Fixtures
) -> None:
    assert len(analyzers(stack)) == 2
    task_id = analyzer.inject(crash_fixtures.crash.problem_dir, "twice-delivered")
    publisher = Publisher(stack.broker_url)
    publisher.publish(ANALYZE, AnalyzeTaskV1(task_id=task_id, arch="x86_64"), "x86_64")
    publisher.close()
    assert analyzer.wait(task_id, timeout=90) == TaskStatus.SUCCESS
    time.sleep(5)  # the second attempt ends meanwhile, and must change nothing
    assert events.drain()[task_id] == 1
    assert sorted(p.name for p in (analyzer.spool / task_id).iterdir()) == ["crash", "results"]
    assert analyzer.store.get_task(task_id).status == TaskStatus.SUCCESS  # type: ignore[union-attr]


def test_two_analyzers_share_ten_tasks_each_finished_once(
    stack: SlowStack, analyzer: Analyzer, events: Events, crash_fixtures: Fixtures
) -> None:
    assert len(analyzers(stack)) == 2
    ids = [
        analyzer.inject(crash_fixtures.crash.problem_dir, f"ten-tasks-{n:02d}") for n in range(10)
    ]
    for task_id in ids:
        assert analyzer.wait(task_id, timeout=180) == TaskStatus.SUCCESS, stack.logs()
    time.sleep(1)
    counts = events.drain()
    assert [counts[task_id] for task_id in ids] == [1] * 10
    workers = set()
    for task_id in ids:
        match = re.search(r"by analyzer (\S+)$", analyzer.result(task_id, "log"), re.MULTILINE)
        assert match is not None
        workers.add(match.group(1))
    assert len(workers) == 2, workers
