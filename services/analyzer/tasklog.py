"""The task log a user reads: each step with its duration, every warning, the reason."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

log = logging.getLogger(__name__)


class TaskLog:
    """Lines for the ``log`` result of one task, also sent to the service log."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self._lines: list[str] = []

    def add(self, text: str) -> None:
        """Add a line, stamped with the time."""
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        for line in text.splitlines() or [""]:
            self._lines.append(f"{stamp} {line}")
        log.info("task %s: %s", self.task_id, text)

    def warn(self, text: str) -> None:
        """Add a warning line."""
        self.add(f"warning: {text}")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Log a step's start and, once it ends, its duration."""
        self.add(f"{name}...")
        started = time.monotonic()
        try:
            yield
        finally:
            self.add(f"{name}: {time.monotonic() - started:.2f} s")

    def text(self) -> str:
        """The whole log."""
        return "\n".join(self._lines) + "\n"
