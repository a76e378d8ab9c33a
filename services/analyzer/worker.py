"""The analyze-command handler: claim the task, retrace it, store the results once.

Results before state: the attempt writes its result folder whole and syncs it to
disk, then the guarded update that finishes the task names that folder
(:meth:`~services.common.spool.Spool.write_results`).  A crash before the update
leaves the task running, and its redelivered command retraces it again; a crash
after it leaves a finished task with its files.  Only then are the result
folders of superseded attempts removed and the finished event published.

A spool too full to take the results (``ENOSPC``, ``EDQUOT``) does not fail the
task: it goes back to queued and its command waits ``results_retry_seconds`` in
``retrace.analyze.<arch>.wait.<n>s`` before it is retried, as often as it takes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy.exc

from schemas.messages import AnalyzeTaskV1, Outcome, TaskFinishedV1, TaskType
from schemas.topology import ANALYZE_WAIT
from services.analyzer.debugshell import MANIFEST
from services.analyzer.fetch import Fetches
from services.analyzer.results import announce_finished, backtrace_json
from services.analyzer.retrace import Job, Retrace, RetraceFailure, WaitForBuild, retrace
from services.analyzer.rootcache import RootCache, WorkFolders
from services.analyzer.tasklog import TaskLog
from services.common import progress
from services.common.bus import Delivery, Later, Publish
from services.common.data.analyzer import AnalyzerData
from services.common.data.intake import IntakeData, TaskStatus
from services.common.data.mirror import MirrorData
from services.common.settings import AnalyzerSettings
from services.common.spool import BACKTRACE, BACKTRACE_JSON, LOG, Spool

log = logging.getLogger(__name__)

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
"""Errors of a disk that may take the same write later: the task is retried, not failed."""

FAULT = "RETRACE_ANALYZER_FAULT"
"""Fault injection for the tests: ``exit-before-finish`` ends the process at once, as a
crash would, between writing a task's results and the update that finishes it."""


def _fault(point: str) -> None:
    if os.environ.get(FAULT) == point:
        log.critical("fault injected: exiting at %s", point)
        os._exit(70)


MAX_LEASE_WAITS = 5
"""A command waits at most this many times for a live analyzer's lease on its task:
an analyzer that keeps dying on a task must not keep it waiting for ever."""


def park_for_lease(later: Later, command: AnalyzeTaskV1, seconds: int) -> None:
    """Send ``command`` to wait ``seconds`` (a lease's life) and come back, counted."""
    retry = command.model_copy(update={"lease_waits": command.lease_waits + 1})
    later(ANALYZE_WAIT, seconds, retry, command.arch)


class LeaseKeeper:
    """Renews an analyzer's lease on a task every ``every`` seconds while it works on it,
    and gives it up at the end, however the work ends."""

    def __init__(self, tasks: IntakeData, task_id: str, owner: str, every: float) -> None:
        self._tasks = tasks
        self._task_id = task_id
        self._owner = owner
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{task_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._tasks.release_lease(self._task_id, self._owner)
        except sqlalchemy.exc.SQLAlchemyError:
            log.warning("task %s: the lease could not be released; it expires", self._task_id)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._tasks.renew_lease(self._task_id, self._owner)
            except sqlalchemy.exc.SQLAlchemyError as exc:
                log.warning("task %s: the lease was not renewed: %s", self._task_id, exc)


def retry_progress(seconds: int) -> str:
    """The progress line of a task whose results could not be written."""
    return f"Waiting for space in the spool to store the results (retry in {seconds} s)"


class AnalyzeHandler:
    """Handles one :class:`AnalyzeTaskV1` at a time; see :class:`~services.common.bus.Consumer`."""

    def __init__(
        self,
        settings: AnalyzerSettings,
        tasks: IntakeData,
        fetch_data: AnalyzerData,
        index: MirrorData,
        spool: Spool,
        cache: RootCache,
        publish: Publish,
        work_root: Path,
        later: Later,
    ) -> None:
        self._settings = settings
        self._tasks = tasks
        self._fetch_data = fetch_data
        self._index = index
        self._spool = spool
        self._cache = cache
        self._publish = publish
        self._later = later
        self._fetches = Fetches(settings, fetch_data, publish, later)
        # What analyzers that died left in the work folder goes now; a live one's stays.
        self._work = WorkFolders(work_root)
        self._work.sweep()
        self._owner = f"{socket.gethostname()}:{os.getpid()}"

    def _lease_fresh_after(self) -> datetime:
        return datetime.now(UTC) - timedelta(seconds=self._settings.lease_seconds)

    def __call__(self, delivery: Delivery) -> None:
        command = delivery.message
        assert isinstance(command, AnalyzeTaskV1)
        task_id = command.task_id
        if not self._fetches.admit(delivery):
            return
        task = self._tasks.get_task(task_id)
        if (
            task is not None
            and task.held_by_other(self._owner, self._lease_fresh_after())
            and command.lease_waits < MAX_LEASE_WAITS
        ):
            # The broker gave this command back after a connection was lost while a
            # live analyzer works on it: wait for that one instead of retracing twice.
            park_for_lease(self._later, command, self._settings.lease_seconds)
            log.info("task %s is held by %s; its command waits", task_id, task.lease_owner)
            return
        # A redelivery after a dead analyzer finds the task still running: take it over.
        # The intake marks a task queued only after its command is published, so the
        # command can arrive while the task is still "submitting".
        claimable = [TaskStatus.SUBMITTING, TaskStatus.QUEUED, TaskStatus.RUNNING]
        if not self._tasks.move_task(
            task_id, claimable, TaskStatus.RUNNING,
            progress=progress.ANALYZE, lease_owner=self._owner, lease_at=datetime.now(UTC),
        ):  # fmt: skip
            log.info("task %s is finished, deleted or unknown; nothing to do", task_id)
            task = self._tasks.get_task(task_id)
            if task is not None and task.status.final and task.task_type != TaskType.DEBUG:
                # Its analyzer may have died between finishing it and deleting its core.
                (self._spool.crash_dir(task_id) / "coredump").unlink(missing_ok=True)
            return
        # The lease is held from the claim to the update that finishes the task.
        with LeaseKeeper(self._tasks, task_id, self._owner, self._settings.lease_seconds / 3):
            self._attempt(command)

    def _attempt(self, command: AnalyzeTaskV1) -> None:
        task_id = command.task_id
        tasklog = TaskLog(task_id)
        tasklog.add(f"Retrace of task {task_id} ({command.arch}) by analyzer {self._owner}")
        outcome: Retrace | RetraceFailure
        try:
            with self._work.held(task_id) as work_dir:
                job = Job(
                    crash_dir=self._spool.crash_dir(task_id),
                    work_dir=work_dir,
                    index=self._index,
                    cache=self._cache,
                    settings=self._settings,
                    log=tasklog,
                    set_progress=lambda text: self._tasks.set_progress(task_id, text),
                    manifest=(
                        self._spool.task_dir(task_id) / MANIFEST
                        if command.task_type == TaskType.DEBUG
                        else None
                    ),
                    fetch_attempt=command.fetch_attempt,
                )
                try:
                    outcome = retrace(job)
                except RetraceFailure as failure:
                    outcome = failure
        except WaitForBuild as wait:
            self._fetches.park(command, wait.nvr)
            return
        except OSError as error:
            if error.errno not in DISK_FULL:
                raise
            self._retry_later(command, error)
            return
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
        try:
            folder = self._spool.write_results(task_id, files)
        except OSError as error:
            task = self._tasks.get_task(task_id)
            if task is None or task.status.final:
                # Deleted with its folder, or finished by another attempt that removed
                # this one's folder as superseded: nothing of ours is wanted.
                log.info("task %s was finished or deleted meanwhile; results dropped", task_id)
                return
            if error.errno not in DISK_FULL:
                raise
            self._retry_later(command, error)
            return
        _fault("exit-before-finish")
        # Only the first attempt to get here wins; a duplicate's results are dropped.
        if not self._tasks.move_task(task_id, [TaskStatus.RUNNING], status, progress=text,
                                     reason=None if status == TaskStatus.SUCCESS else str(outcome),
                                     crash_function=event.crash_function,
                                     crash_module=event.crash_module,
                                     results=folder):  # fmt: skip
            self._spool.drop_result(task_id, folder)
            log.info("task %s was finished or deleted meanwhile; results dropped", task_id)
            return
        self._spool.drop_results(task_id, keep=folder)
        announce_finished(self._publish, event, self._spool, command.task_type)
        log.info("task %s finished: %s", task_id, status)

    def _retry_later(self, command: AnalyzeTaskV1, error: OSError) -> None:
        """The disk is full: back to queued, and the command waits before it comes back."""
        seconds = self._settings.results_retry_seconds
        if not self._fetch_data.requeue_task(command.task_id, retry_progress(seconds)):
            log.info("task %s was finished or deleted meanwhile", command.task_id)
            return
        retry = AnalyzeTaskV1(
            task_id=command.task_id,
            arch=command.arch,
            task_type=command.task_type,
            submitted_at=command.submitted_at,
            fetch_attempt=command.fetch_attempt,
        )
        self._later(ANALYZE_WAIT, seconds, retry, command.arch)
        log.warning(
            "task %s: the spool cannot take its results (%s); retrying in %d s",
            command.task_id,
            error.strerror or error,
            seconds,
        )
