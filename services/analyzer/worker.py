"""The analyze-command handler: claim the task, retrace it, store the results once."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from schemas.messages import AnalyzeTaskV1, Outcome, TaskFinishedV1, TaskType
from services.analyzer.debugshell import MANIFEST
from services.analyzer.fetch import Fetches
from services.analyzer.results import announce_finished, backtrace_json
from services.analyzer.retrace import Job, Retrace, RetraceFailure, WaitForBuild, retrace
from services.analyzer.rootcache import RootCache
from services.analyzer.tasklog import TaskLog
from services.common import progress
from services.common.bus import Delivery, Later, Publish
from services.common.settings import AnalyzerSettings
from services.common.spool import BACKTRACE, BACKTRACE_JSON, LOG, Spool
from services.common.store import Store, TaskStatus

log = logging.getLogger(__name__)


class AnalyzeHandler:
    """Handles one :class:`AnalyzeTaskV1` at a time; see :class:`~services.common.bus.Consumer`."""

    def __init__(
        self,
        settings: AnalyzerSettings,
        store: Store,
        spool: Spool,
        cache: RootCache,
        publish: Publish,
        work_root: Path,
        later: Later,
    ) -> None:
        self._settings = settings
        self._store = store
        self._spool = spool
        self._cache = cache
        self._publish = publish
        self._work_root = work_root
        self._fetches = Fetches(settings, store, publish, later)

    def __call__(self, delivery: Delivery) -> None:
        command = delivery.message
        assert isinstance(command, AnalyzeTaskV1)
        task_id = command.task_id
        if not self._fetches.admit(delivery):
            return
        # A redelivery after a dead analyzer finds the task still running: take it over.
        # The intake marks a task queued only after its command is published, so the
        # command can arrive while the task is still "submitting".
        claimable = [TaskStatus.SUBMITTING, TaskStatus.QUEUED, TaskStatus.RUNNING]
        if not self._store.move_task(
            task_id, claimable, TaskStatus.RUNNING,
            progress=progress.ANALYZE,
        ):  # fmt: skip
            log.info("task %s is finished, deleted or unknown; nothing to do", task_id)
            return
        tasklog = TaskLog(task_id)
        tasklog.add(
            f"Retrace of task {task_id} ({command.arch}) by analyzer "
            f"{socket.gethostname()}:{os.getpid()}"
        )
        self._work_root.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix=f"{task_id}-", dir=self._work_root))
        outcome: Retrace | RetraceFailure
        try:
            job = Job(
                crash_dir=self._spool.crash_dir(task_id),
                work_dir=work_dir,
                store=self._store,
                cache=self._cache,
                settings=self._settings,
                log=tasklog,
                set_progress=lambda text: self._store.set_progress(task_id, text),
                manifest=(
                    self._spool.task_dir(task_id) / MANIFEST
                    if command.task_type == TaskType.DEBUG
                    else None
                ),
                fetch_attempt=command.fetch_attempt,
            )
            outcome = retrace(job)
        except RetraceFailure as failure:
            outcome = failure
        except WaitForBuild as wait:
            self._fetches.park(command, wait.nvr)
            return
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        self._finish(command, tasklog, outcome)

    def _finish(
        self, command: AnalyzeTaskV1, tasklog: TaskLog, outcome: Retrace | RetraceFailure
    ) -> None:
        task_id = command.task_id
        files: dict[str, str] = {}
        if isinstance(outcome, Retrace):
            status, text = TaskStatus.SUCCESS, progress.SUCCESS
            files[BACKTRACE] = outcome.gdb.backtrace
            files[BACKTRACE_JSON] = backtrace_json(task_id, outcome)
            tasklog.add("Retrace finished successfully.")
            event = TaskFinishedV1(
                task_id=task_id,
                arch=command.arch,
                outcome=Outcome.SUCCESS,
                crash_function=outcome.gdb.crash_function,
                crash_module=outcome.gdb.crash_module,
            )
        else:
            status, text = TaskStatus.FAILURE, progress.FAIL
            tasklog.add(f"Retrace failed: {outcome}")
            event = TaskFinishedV1(
                task_id=task_id, arch=command.arch, outcome=Outcome.FAILURE, reason=str(outcome)
            )
        files[LOG] = tasklog.text()
        staged = self._spool.stage_results(task_id, files)
        # Only the first attempt to get here wins; a duplicate's results are dropped.
        if not self._store.move_task(task_id, [TaskStatus.RUNNING], status, progress=text,
                                     reason=None if status == TaskStatus.SUCCESS else str(outcome),
                                     crash_function=event.crash_function,
                                     crash_module=event.crash_module):  # fmt: skip
            shutil.rmtree(staged, ignore_errors=True)
            log.info("task %s was finished or deleted meanwhile; results dropped", task_id)
            return
        self._spool.commit_results(task_id, staged)
        announce_finished(self._publish, event, self._spool, command.task_type)
        log.info("task %s finished: %s", task_id, status)
