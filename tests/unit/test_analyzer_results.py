"""Results before state, a full spool, and work folders: services/analyzer/worker.py,
services/common/spool.py and the work folders of services/analyzer/rootcache.py.

The store is real (SQLite); the broker is replaced by lists of what would be sent, the
retrace itself by one that fails at once, the disk by a spool that cannot write.
test_analyzer_delivery.py (integration) crashes real analyzers at these points.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.messages import AnalyzeTaskV1, Message
from schemas.topology import ANALYZE_WAIT, TASK_FINISHED, Route, WaitRoute
from services.analyzer import worker
from services.analyzer.retrace import Job, RetraceFailure
from services.analyzer.rootcache import RootCache, WorkFolders
from services.analyzer.worker import AnalyzeHandler, retry_progress
from services.common.bus import Delivery
from services.common.data.intake import TaskStatus
from services.common.settings import AnalyzerSettings
from services.common.spool import LOG, Spool
from tests.data import Data

TASK = "results-task-1"


class Bus:
    def __init__(self) -> None:
        self.events: list[Message] = []
        self.parked: list[tuple[int, Message]] = []

    def publish(self, route: Route, message: Message, _arch: str | None) -> None:
        assert route is TASK_FINISHED
        self.events.append(message)

    def later(self, wait: WaitRoute, seconds: int, message: Message, _arch: str | None) -> None:
        assert wait is ANALYZE_WAIT
        self.parked.append((seconds, message))


class FullSpool(Spool):
    """A spool whose next ``failures`` result writes fail with ``error``."""

    def __init__(self, root: Path, error: int, failures: int = 1) -> None:
        super().__init__(root)
        self.error = error
        self.failures = failures

    def write_results(self, task_id: str, files: dict[str, str]) -> str:
        if self.failures:
            self.failures -= 1
            raise OSError(self.error, os.strerror(self.error))
        return super().write_results(task_id, files)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Data]:
    store = Data.from_url(f"sqlite:///{tmp_path}/retrace.sqlite3")
    store.migrate()
    store.intake.create_task(TASK, "digest", "x86_64", "retrace", "queued")
    assert store.intake.move_task(TASK, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
    yield store
    store.engine.dispose()


@pytest.fixture(autouse=True)
def failing_retrace(monkeypatch: pytest.MonkeyPatch) -> None:
    def retrace(job: Job) -> None:
        assert job.work_dir.is_dir()
        raise RetraceFailure("The core dump is not usable: a test said so.")

    monkeypatch.setattr(worker, "retrace", retrace)


def handler_for(tmp_path: Path, store: Data, spool: Spool, bus: Bus) -> AnalyzeHandler:
    (spool.crash_dir(TASK)).mkdir(parents=True, exist_ok=True)
    return AnalyzeHandler(
        AnalyzerSettings(results_retry_seconds=7),
        store.intake,
        store.analyzer,
        store.mirror,
        spool,
        RootCache(tmp_path / "cache", tmp_path / "repo"),
        bus.publish,
        tmp_path / "cache" / "work",
        bus.later,
    )


def delivery() -> Delivery:
    return Delivery(AnalyzeTaskV1(task_id=TASK, arch="x86_64"), False, {}, "message-1")


def result_folders(spool: Spool) -> list[str]:
    return sorted(p.name for p in spool.task_dir(TASK).iterdir() if p.name.startswith("results"))


def test_results_are_synced_to_disk_before_the_update_names_their_folder(
    tmp_path: Path, store: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    bus = Bus()
    handler = handler_for(tmp_path, store, spool, bus)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        task = store.intake.get_task(TASK)
        assert task is not None
        assert task.status == TaskStatus.RUNNING  # not finished before its files are synced
        synced.append(str(Path(f"/proc/self/fd/{fd}").readlink()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    handler(delivery())
    task = store.intake.get_task(TASK)
    assert task is not None
    assert task.status == TaskStatus.FAILURE
    assert task.results is not None
    folder = spool.results_dir(TASK, task.results)
    assert synced == [str(folder / LOG), str(folder), str(spool.task_dir(TASK))]
    assert "a test said so" in (folder / LOG).read_text()
    assert spool.read_result(TASK, task.results, LOG) == (folder / LOG).read_bytes()
    assert len(bus.events) == 1


def test_a_superseded_attempts_results_are_removed_by_the_one_that_finishes(
    tmp_path: Path, store: Data
) -> None:
    spool = Spool(tmp_path / "spool")
    handler = handler_for(tmp_path, store, spool, Bus())
    # An attempt that died after writing its files, before its update; and the folder
    # of a task finished before the row named its folder.
    crashed = spool.write_results(TASK, {LOG: "half a story"})
    (spool.task_dir(TASK) / "results").mkdir()
    handler(delivery())
    task = store.intake.get_task(TASK)
    assert task is not None
    assert task.results not in (None, crashed)
    assert result_folders(spool) == [task.results]
    assert spool.crash_dir(TASK).is_dir()


def test_an_attempt_that_loses_the_update_removes_only_its_own_folder(
    tmp_path: Path, store: Data
) -> None:
    spool = Spool(tmp_path / "spool")
    bus = Bus()
    handler = handler_for(tmp_path, store, spool, bus)
    handler(delivery())
    task = store.intake.get_task(TASK)
    assert task is not None
    # A late duplicate finds the task final: it claims nothing, writes nothing.
    handler(delivery())
    assert result_folders(spool) == [task.results]
    assert len(bus.events) == 1


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_spool_too_full_for_the_results_retries_the_task_later(
    tmp_path: Path, store: Data, error: int
) -> None:
    spool = FullSpool(tmp_path / "spool", error)
    bus = Bus()
    handler = handler_for(tmp_path, store, spool, bus)
    handler(delivery())  # returns: the command is acked, its retry parked
    task = store.intake.get_task(TASK)
    assert task is not None
    assert task.status == TaskStatus.QUEUED
    assert task.progress == retry_progress(7)
    [(seconds, retry)] = bus.parked
    assert seconds == 7
    assert isinstance(retry, AnalyzeTaskV1)
    assert retry.task_id == TASK
    assert bus.events == []
    assert result_folders(spool) == []
    # The retry's copy comes back from the wait queue: now the disk takes the results.
    handler(Delivery(retry, False, {}, "message-2"))
    task = store.intake.get_task(TASK)
    assert task is not None
    assert task.status == TaskStatus.FAILURE  # the retrace's own outcome
    assert result_folders(spool) == [task.results]
    assert len(bus.events) == 1


def test_another_write_error_is_raised_for_the_broker_to_requeue(
    tmp_path: Path, store: Data
) -> None:
    spool = FullSpool(tmp_path / "spool", errno.EIO)
    bus = Bus()
    handler = handler_for(tmp_path, store, spool, bus)
    with pytest.raises(OSError, match="Input/output error"):
        handler(delivery())
    task = store.intake.get_task(TASK)
    assert task is not None
    assert task.status == TaskStatus.RUNNING  # its redelivery takes it over
    assert bus.parked == []


def test_the_retry_of_a_task_that_waited_for_its_build_may_run_it(
    tmp_path: Path, store: Data
) -> None:
    spool = FullSpool(tmp_path / "spool", errno.ENOSPC)
    bus = Bus()
    handler = handler_for(tmp_path, store, spool, bus)
    # The task once waited for its build, and the copy "woken" ran it.
    assert store.intake.move_task(TASK, [TaskStatus.QUEUED], TaskStatus.RUNNING)
    assert store.analyzer.park_task(TASK, "crasher-1.0-2.fc40", 1, "waiting")
    assert store.analyzer.wake_task(TASK, 1, "woken")
    handler(
        Delivery(AnalyzeTaskV1(task_id=TASK, arch="x86_64", fetch_attempt=1), False, {}, "woken")
    )
    [(_, retry)] = bus.parked
    handler(Delivery(retry, False, {}, "the-retry"))
    task = store.intake.get_task(TASK)
    assert task is not None
    assert task.status == TaskStatus.FAILURE


HOLDER = """
import sys, time
from pathlib import Path
from services.analyzer.rootcache import WorkFolders
with WorkFolders(Path(sys.argv[1])).held(sys.argv[2]) as folder:
    print(folder, flush=True)
    time.sleep(60)
"""


def hold_in_child(root: Path, prefix: str) -> tuple[subprocess.Popen[str], Path]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), prefix],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def kill(child: subprocess.Popen[str]) -> None:
    """SIGKILL: the child's locks go with it, its folder stays."""
    with child:
        child.kill()


def test_a_sweep_removes_what_dead_processes_left_and_nothing_a_live_one_holds(
    tmp_path: Path,
) -> None:
    root = tmp_path / "work"
    folders = WorkFolders(root)
    dead, dead_folder = hold_in_child(root, "dead-task")
    live, live_folder = hold_in_child(root, "live-task")
    try:
        kill(dead)
        (dead_folder / "root").mkdir()
        with folders.held("mine") as mine:
            assert folders.sweep() == [dead_folder.name]
            assert mine.is_dir()
        assert not mine.exists()
        assert not dead_folder.exists()
        assert live_folder.is_dir()
    finally:
        kill(live)
    assert WorkFolders(root).sweep() == [live_folder.name]
    assert sorted(p.name for p in root.iterdir()) == [".locks"]
