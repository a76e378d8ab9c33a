"""A crash of a build the mirror lacks: the analyzer asks the mirror, waits, retries.

The real mirror worker fetches builds from the Koji stand-in, which serves the
fixture's ``crasher`` build; the stack's mirror starts without it.  Waits are
short (``fetch_wait_seconds``), so that a test sees a wait queue's copy come back.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.messages import MirrorBuildV1, TaskFinishedV1, parse
from schemas.topology import EXCHANGE, MIRROR_BUILD, TASK_FINISHED
from services.common.bus import connect
from services.common.data.intake import TaskStatus
from tests.fixtures.build import Fixtures
from tests.integration.koji_hub import KojiStandIn
from tests.integration.stack import Stack
from tests.integration.test_analyzer import Analyzer
from tests.integration.test_end_to_end import submit

pytestmark = pytest.mark.integration

CRASHER_BUILD = 301
WAIT_SECONDS = 8
ATTEMPTS = 2


class Spy:
    """Every mirror command and task.finished event published while the module runs."""

    def __init__(self, broker_url: str) -> None:
        self.connection = connect(broker_url)
        self.channel = self.connection.channel()
        self.queues: dict[str, str] = {}
        for topic in (MIRROR_BUILD.topic, TASK_FINISHED.topic):
            queue = self.channel.queue_declare("", exclusive=True).method.queue
            assert queue is not None
            self.channel.queue_bind(queue, EXCHANGE, routing_key=topic)
            self.queues[topic] = queue
        self.requests: list[MirrorBuildV1] = []
        self.finished: list[TaskFinishedV1] = []

    def _bodies(self, topic: str) -> list[bytes | str]:
        bodies: list[bytes | str] = []
        while True:
            method, _props, body = self.channel.basic_get(self.queues[topic], auto_ack=True)
            if method is None or body is None:
                return bodies
            bodies.append(body)

    def drain(self) -> None:
        self.requests += [parse(MirrorBuildV1, b) for b in self._bodies(MIRROR_BUILD.topic)]
        self.finished += [parse(TaskFinishedV1, b) for b in self._bodies(TASK_FINISHED.topic)]

    def requested(self, nvr: str) -> int:
        self.drain()
        return sum(1 for r in self.requests if r.build == nvr)

    def results(self) -> Counter[str]:
        self.drain()
        return Counter(event.task_id for event in self.finished)


def wait_for(check: Callable[[], bool], what: str, stack: Stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen\n{stack.logs()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("analyzer-fetch")
    koji = KojiStandIn(root / "koji").start()
    crasher = [r for r in crash_fixtures.rpms if r.sourcerpm.startswith("crasher-")]
    koji.add_build(CRASHER_BUILD, [r.path for r in crasher])
    settings = (
        f'[mirror]\nkoji_hub = "{koji.hub_url}"\nkoji_topurl = "{koji.top_url}"\n'
        "retry_delays = [1]\nkoji_timeout = 10\n"
    )
    stack = Stack(
        root / "home",
        make_broker_url(),
        overrides={
            "RETRACE_ANALYZER__FETCH_WAIT_SECONDS": str(WAIT_SECONDS),
            "RETRACE_ANALYZER__FETCH_ATTEMPTS": str(ATTEMPTS),
        },
        extra_settings=settings,
    )
    stack.up()
    others = [str(r.path) for r in crash_fixtures.rpms if r not in crasher]
    imported = stack.command("retrace-mirror", "import", *others)
    assert imported.returncode == 0, imported.stderr
    stack.start("retrace-mirror", "worker", log_name="mirror-worker")
    yield stack
    stack.down()
    koji.stop()


@pytest.fixture(scope="module")
def spy(stack: Stack) -> Iterator[Spy]:
    spy = Spy(stack.broker_url)
    yield spy
    spy.connection.close()


def test_a_crash_of_an_unmirrored_build_is_retraced_once_the_mirror_fetched_it(
    stack: Stack, spy: Spy, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    crash = crash_fixtures.crash
    nvr = crash.package
    task_id, password = submit(stack, crash_fixtures, tmp_path)
    wait_for(lambda: spy.requested(nvr) >= 1, f"a mirror command for {nvr}", stack)
    assert any(task_id in r.requested_by for r in spy.requests)

    assert stack.wait_finished(task_id, password, timeout=120) == "FINISHED_SUCCESS"
    _, _, backtrace = stack.request(
        "GET", f"/{task_id}/backtrace", headers={"X-Task-Password": password}
    )
    assert f"in {crash.function} (" in backtrace.decode()
    _, _, log = stack.request("GET", f"/{task_id}/log", headers={"X-Task-Password": password})
    assert f"The crashed package's build {nvr} was fetched by the mirror on request" in (
        log.decode()
    )
    logs = stack.logs()
    assert f"task {task_id}: build {nvr} is mirrored now; retrying it at once" in logs

    # The copy in the wait queue comes back after its TTL and finds the task woken.
    woken = f"task {task_id}: another copy of its command already woke it"
    wait_for(lambda: woken in stack.logs(), "the wait queue's copy", stack, WAIT_SECONDS + 30)
    assert spy.results()[task_id] == 1
    status, headers, _ = stack.request("GET", f"/{task_id}", headers={"X-Task-Password": password})
    assert (status, headers["X-Task-Status"]) == (200, "FINISHED_SUCCESS")


def test_a_build_the_mirror_never_gets_is_given_up_after_the_configured_requests(
    stack: Stack, spy: Spy, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    analyzer = Analyzer(stack)
    problem = tmp_path / "problem"
    shutil.copytree(crash_fixtures.extra("dwz-in-lib").problem_dir, problem)
    nvr = "shapes-9.9-9.fc40"  # Koji has no such build: the mirror refuses it
    (problem / "package").write_text(nvr)
    task_id = analyzer.inject(problem, "never-fetched")

    def waiting() -> bool:
        task = analyzer.store.intake.get_task(task_id)
        return task is not None and "waiting for the mirror to fetch" in task.progress

    wait_for(waiting, "the waiting progress line", stack)
    task = analyzer.store.intake.get_task(task_id)
    assert task is not None
    assert task.status == TaskStatus.QUEUED
    assert task.progress.startswith(
        f"Downloading remote resources: waiting for the mirror to fetch {nvr} (request 1 of 2"
    )
    # The wait is kept by the broker, not by a process: another analyzer picks it up.
    (first,) = [p for p in stack.processes if "retrace-analyzer" in str(p.args)]
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    stack.processes.remove(first)
    stack.start("retrace-analyzer", "run", log_name="retrace-analyzer-2")
    assert analyzer.wait(task_id, timeout=WAIT_SECONDS * ATTEMPTS + 90) == TaskStatus.SUCCESS
    log = analyzer.result(task_id, "log")
    assert (
        f"warning: the crashed package's build {nvr} could not be fetched: "
        f"the mirror was asked {ATTEMPTS} times" in log
    )
    assert spy.requested(nvr) == ATTEMPTS
    assert spy.results()[task_id] == 1
    assert f"Koji has no build '{nvr}'" in stack.logs()
