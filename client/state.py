"""The client's memory of its tasks: server, id and current password of each."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from client.errors import ClientError


def default_path() -> Path:
    """``$XDG_STATE_HOME/retrace-client/tasks.json``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "retrace-client" / "tasks.json"


@dataclass
class Remembered:
    """One task the client created."""

    server: str
    password: str


class State:
    """The state file; every change is written at once, atomically, readable only by you."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Remembered]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot read the task list {self.path}: {exc}") from exc
        return {task: Remembered(**entry) for task, entry in raw.get("tasks", {}).items()}

    def get(self, task: str) -> Remembered | None:
        """What is remembered of ``task``."""
        return self._load().get(task)

    def put(self, task: str, entry: Remembered) -> None:
        """Remember ``task`` (or its new password)."""
        tasks = self._load()
        tasks[task] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tasks-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"tasks": {t: asdict(e) for t, e in tasks.items()}}, f, indent=2)
        Path(tmp).chmod(0o600)
        Path(tmp).replace(self.path)
