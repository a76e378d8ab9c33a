"""The spool: one folder per task, shared by the intake and the analyzers.

``<spool>/<task_id>/crash/`` holds the unpacked problem directory as uploaded;
``<spool>/<task_id>/results.<attempt>/`` holds what one analyzer attempt produced
(``backtrace``, ``backtrace.json``, ``log``).  An attempt writes its folder whole
and syncs it to disk (:meth:`Spool.write_results`) before the guarded update that
finishes the task names it in the task's row; readers read only the folder the
row names, so nobody ever sees half a result, or a finished task without one,
whatever crashes when.  A task finished before the row named its folder has the
plain ``results/``.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

CRASH = "crash"
RESULTS = "results"
BACKTRACE = "backtrace"
BACKTRACE_JSON = "backtrace.json"
LOG = "log"
_OLD_STAGING = ".results-"
"""Prefix of the staging folders of the version before result folders were named."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def results_dir(self, task_id: str, folder: str | None) -> Path:
        """The result folder ``folder`` of the task, as its row names it (``None``: the
        plain ``results`` of a task finished before the row named its folder)."""
        return self.task_dir(task_id) / (folder or RESULTS)

    def create(self, task_id: str) -> Path:
        """Make the task's folders; return the crash directory to fill."""
        crash = self.crash_dir(task_id)
        crash.mkdir(parents=True, exist_ok=False)
        return crash

    def write_results(self, task_id: str, files: dict[str, str]) -> str:
        """Write ``files`` into a new result folder of the task, on disk; return its name.

        The files, the folder and its entry in the task's folder are synced before
        this returns, so the guarded update that names the folder may follow: after a
        crash at any moment a row names either no folder or a complete one.  Each
        attempt writes a folder of its own, so two attempts never mix their files.
        Raises :class:`OSError` (``ENOSPC``, ``EDQUOT`` ...) with nothing left behind.
        """
        task_dir = self.task_dir(task_id)
        name = f"{RESULTS}.{secrets.token_hex(8)}"
        folder = task_dir / name
        folder.mkdir()
        try:
            for file_name, text in files.items():
                with (folder / file_name).open("w", encoding="utf-8") as out:
                    out.write(text)
                    out.flush()
                    os.fsync(out.fileno())
            _fsync_dir(folder)
            _fsync_dir(task_dir)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return name

    def drop_results(self, task_id: str, keep: str | None = None) -> None:
        """Remove every result folder of the task but ``keep``: those of superseded
        attempts (a crashed one, a duplicate that lost), or of an attempt whose
        update found the task finished or deleted (``keep=None`` removes all)."""
        try:
            entries = list(self.task_dir(task_id).iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.name
            ours = name == RESULTS or name.startswith((f"{RESULTS}.", _OLD_STAGING))
            if ours and name != keep:
                shutil.rmtree(entry, ignore_errors=True)

    def drop_result(self, task_id: str, folder: str) -> None:
        """Remove one attempt's result folder (one whose update did not win)."""
        shutil.rmtree(self.task_dir(task_id) / folder, ignore_errors=True)

    def read_result(self, task_id: str, folder: str | None, name: str) -> bytes | None:
        """One file of the task's result folder ``folder``, or ``None`` if it does not exist."""
        try:
            return (self.results_dir(task_id, folder) / name).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, task_id: str) -> None:
        """Delete everything the spool holds for a task."""
        shutil.rmtree(self.task_dir(task_id), ignore_errors=True)
