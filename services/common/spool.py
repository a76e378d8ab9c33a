"""The spool: one folder per task, shared by the intake and the analyzers.

``<spool>/<task_id>/crash/`` holds the unpacked problem directory as uploaded;
``<spool>/<task_id>/results/`` holds what the analyzer produced (``backtrace``,
``log``).  Results are written into a fresh folder and renamed into place, so a
reader never sees half of them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

CRASH = "crash"
RESULTS = "results"
BACKTRACE = "backtrace"
BACKTRACE_JSON = "backtrace.json"
LOG = "log"


class Spool:
    """Paths and atomic writes in the spool folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def task_dir(self, task_id: str) -> Path:
        """The task's own folder."""
        return self.root / task_id

    def crash_dir(self, task_id: str) -> Path:
        """The unpacked problem directory of the task."""
        return self.task_dir(task_id) / CRASH

    def results_dir(self, task_id: str) -> Path:
        """The finished results of the task (absent until it has some)."""
        return self.task_dir(task_id) / RESULTS

    def create(self, task_id: str) -> Path:
        """Make the task's folders; return the crash directory to fill."""
        crash = self.crash_dir(task_id)
        crash.mkdir(parents=True, exist_ok=False)
        return crash

    def stage_results(self, task_id: str, files: dict[str, str]) -> Path:
        """Write result files into a staging folder of their own; see :meth:`commit_results`.

        Each attempt stages separately, so two attempts never mix their files.
        """
        staging = Path(tempfile.mkdtemp(prefix=".results-", dir=self.task_dir(task_id)))
        try:
            for name, text in files.items():
                (staging / name).write_text(text, encoding="utf-8")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def commit_results(self, task_id: str, staging: Path) -> None:
        """Make staged results the task's results, all at once."""
        final = self.results_dir(task_id)
        if final.exists():
            shutil.rmtree(final)
        staging.replace(final)

    def read_result(self, task_id: str, name: str) -> bytes | None:
        """One result file's content, or ``None`` if it does not exist."""
        try:
            return (self.results_dir(task_id) / name).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, task_id: str) -> None:
        """Delete everything the spool holds for a task."""
        shutil.rmtree(self.task_dir(task_id), ignore_errors=True)
