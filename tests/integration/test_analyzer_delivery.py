"""Delivery: dead analyzers, duplicates, poison and malformed commands, two analyzers;
a crash between writing the results and finishing the task, the work folders a
killed analyzer leaves, a spool too full for the results.

The analyzer's gdb is wrapped to take two seconds longer, so that a test can act
while a retrace runs; everything else is the real system.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from schemas.messages import AnalyzeTaskV1, TaskFinishedV1, parse
from schemas.topology import ANALYZE, EXCHANGE, TASK_FINISHED
from services.analyzer.worker import FAULT, retry_progress
from services.common import progress
from services.common.bus import Publisher, connect, properties_for
from services.common.data.intake import TaskStatus
from tests.data import Data
from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack, pack_problem_dir
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
    analyzer.store.intake.create_task(task_id, "x", "x86_64", "retrace", progress.QUEUED)
    assert analyzer.store.intake.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
    (analyzer.spool / task_id).mkdir(parents=True)
    publisher = Publisher(stack.broker_url)
    publisher.publish(ANALYZE, AnalyzeTaskV1(task_id=task_id, arch="x86_64"), "x86_64")
    publisher.close()
    assert analyzer.wait(task_id, timeout=60) == TaskStatus.FAILURE
    task = analyzer.store.intake.get_task(task_id)
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
    analyzer.store.intake.create_task(task_id, "x", "x86_64", "retrace", progress.QUEUED)
    assert analyzer.store.intake.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
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
    while (task := analyzer.store.intake.get_task(task_id)) and task.progress != progress.BACKTRACE:
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
    task = analyzer.store.intake.get_task(task_id)
    assert task is not None
    assert task.status == TaskStatus.SUCCESS
    # One result folder, the one the row names: the losing attempt's is gone.
    assert sorted(p.name for p in (analyzer.spool / task_id).iterdir()) == ["crash", task.results]


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


def stop_analyzers(stack: Stack) -> None:
    for proc in stack.processes:
        if "retrace-analyzer" in str(proc.args) and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


def start_analyzer(
    stack: Stack, log_name: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    saved = dict(stack.overrides)
    stack.overrides.update(env or {})
    try:
        return stack.start("retrace-analyzer", "run", log_name=log_name)
    finally:
        stack.overrides.clear()
        stack.overrides.update(saved)


def result_folders(task_dir: Path) -> list[str]:
    return sorted(p.name for p in task_dir.iterdir() if p.name.startswith("results"))


def test_a_crash_between_results_and_state_ends_finished_once_with_its_files(
    stack: SlowStack,
    analyzer: Analyzer,
    events: Events,
    crash_fixtures: Fixtures,
    tmp_path: Path,
) -> None:
    stop_analyzers(stack)
    # This analyzer exits, as a crash would, just after it wrote and synced the results.
    doomed = start_analyzer(stack, "analyzer-doomed", {FAULT: "exit-before-finish"})
    body = pack_problem_dir(crash_fixtures.crash.problem_dir, tmp_path / "crash.tar.xz")
    status, headers, text = stack.request(
        "POST", "/create", body.read_bytes(), {"Content-Type": "application/x-xz-compressed-tar"}
    )
    assert status == 201, text
    task_id = headers["X-Task-Id"]
    auth = {"X-Task-Password": headers["X-Task-Password"]}
    assert doomed.wait(timeout=90) == 70, stack.logs()
    task_dir = analyzer.spool / task_id
    task = analyzer.store.intake.get_task(task_id)
    assert task is not None
    assert (task.status, task.results) == (TaskStatus.RUNNING, None)
    [written] = result_folders(task_dir)  # complete on disk, named by no row
    assert crash_fixtures.crash.function in (task_dir / written / "backtrace").read_text()
    # Until a row names a folder the task is not finished, and has no result to give.
    status, headers, _ = stack.request("GET", f"/{task_id}", headers=auth)
    assert (status, headers["X-Task-Status"]) == (200, "PENDING")
    assert stack.request("GET", f"/{task_id}/backtrace", headers=auth)[0] == 404
    assert stack.request("GET", f"/{task_id}/log", headers=auth)[0] == 404

    # The dead analyzer never acked the command: the broker hands it to the next one.
    start_analyzer(stack, "analyzer-after-crash-1")
    start_analyzer(stack, "analyzer-after-crash-2")
    assert stack.wait_finished(task_id, auth["X-Task-Password"]) == "FINISHED_SUCCESS"
    status, _, backtrace = stack.request("GET", f"/{task_id}/backtrace", headers=auth)
    assert status == 200
    assert f"in {crash_fixtures.crash.function} (" in backtrace.decode()
    status, _, log = stack.request("GET", f"/{task_id}/log", headers=auth)
    assert status == 200
    assert "Retrace finished successfully." in log.decode()
    task = analyzer.store.intake.get_task(task_id)
    assert task is not None
    assert task.results not in (None, written)
    assert result_folders(task_dir) == [task.results]  # the crashed attempt's is gone
    time.sleep(1)
    assert events.drain()[task_id] == 1


HOLDER = """
import sys, time
from pathlib import Path
from services.analyzer.rootcache import WorkFolders
with WorkFolders(Path(sys.argv[1])).held("live-task") as folder:
    print(folder, flush=True)
    time.sleep(120)
"""


def test_a_killed_analyzers_work_folder_goes_at_the_next_start_a_live_ones_stays(
    stack: SlowStack, analyzer: Analyzer, crash_fixtures: Fixtures
) -> None:
    stop_analyzers(stack)
    victim = start_analyzer(stack, "analyzer-victim")
    task_id = analyzer.inject(crash_fixtures.crash.problem_dir, "work-folder-left")
    deadline = time.monotonic() + 60
    while (task := analyzer.store.intake.get_task(task_id)) and task.progress != progress.BACKTRACE:
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)
    work = stack.home / "var" / "cache" / "analyzer" / "work"
    [left] = work.glob(f"{task_id}-*")
    victim.kill()
    victim.wait()
    assert left.is_dir()
    # A second process holds a work folder of its own (as a live analyzer would).
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(work)], stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None
        held = Path(holder.stdout.readline().strip())
        assert held.is_dir()
        start_analyzer(stack, "analyzer-sweeper-1")
        start_analyzer(stack, "analyzer-sweeper-2")
        assert analyzer.wait(task_id, timeout=90) == TaskStatus.SUCCESS, stack.logs()
        assert not left.exists()
        assert held.is_dir()
        # Read whole: stack.logs() keeps only each log's tail.
        sweepers = "".join(
            (stack.home / f"analyzer-sweeper-{n}.log").read_text(errors="replace") for n in (1, 2)
        )
        assert f"removed {left.name}, left in {work} by an analyzer that died" in sweepers
        holder.kill()
    assert [p.name for p in work.iterdir() if not p.name.startswith(".")] == [held.name]


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (the tests run as root, as CI does)."""
    spool = tmp_path / "small-spool"
    spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(spool)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"a tmpfs spool needs root: {mounted.stderr}")
    yield spool
    subprocess.run(["umount", "--lazy", str(spool)], check=True)


def write_forever(out: BinaryIO) -> None:
    while True:
        out.write(b"\0" * 65536)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` up: write until ENOSPC."""
    ballast = folder / "ballast"
    with ballast.open("wb", buffering=0) as out, pytest.raises(OSError, match="No space left"):
        write_forever(out)
    return ballast


def test_a_spool_too_full_for_the_results_leaves_the_task_to_be_retried(
    tmp_path: Path,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
    small_spool: Path,
) -> None:
    # A delivery limit of 0: a command requeued even once would fail its task at once.
    stack = Stack(
        tmp_path / "home",
        make_broker_url(),
        overrides={
            "RETRACE_PATHS__SPOOL": str(small_spool),
            "RETRACE_ANALYZER__RESULTS_RETRY_SECONDS": "1",
            "RETRACE_BROKER__DELIVERY_LIMIT": "0",
        },
    )
    stack.write_settings()
    for admin in (("migrate",), ("topology",), ("policies",)):
        done = stack.command("retrace-admin", *admin)
        assert done.returncode == 0, done.stderr
    imported = stack.command(
        "retrace-mirror", "import", *[str(r.path) for r in crash_fixtures.rpms]
    )
    assert imported.returncode == 0, imported.stderr
    store = Data.from_url(f"sqlite:///{stack.home}/var/retrace.sqlite3")
    task_id = "spool-full"
    shutil.copytree(crash_fixtures.crash.problem_dir, small_spool / task_id / "crash")
    store.intake.create_task(task_id, "digest", "x86_64", "retrace", progress.QUEUED)
    assert store.intake.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
    ballast = fill(small_spool)
    stack.start("retrace-analyzer", "run")
    try:
        publisher = Publisher(stack.broker_url)
        publisher.publish(ANALYZE, AnalyzeTaskV1(task_id=task_id, arch="x86_64"), "x86_64")
        publisher.close()
        waiting = f"task {task_id}: the spool cannot take its results (No space left on device)"
        deadline = time.monotonic() + 60
        while stack.logs().count(waiting) < 2:  # retried, and full again
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.2)
        task = store.intake.get_task(task_id)
        assert task is not None
        assert not task.status.final
        assert task.progress in (retry_progress(1), progress.ANALYZE)
        assert result_folders(small_spool / task_id) == []
        ballast.unlink()
        deadline = time.monotonic() + 60
        while not (task := store.intake.get_task(task_id)) or not task.status.final:
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.2)
        assert task.status == TaskStatus.SUCCESS, stack.logs()
        assert result_folders(small_spool / task_id) == [task.results]
        assert (
            crash_fixtures.crash.function
            in (small_spool / task_id / str(task.results) / "backtrace").read_text()
        )
    finally:
        stack.down()
        store.engine.dispose()
