"""A stream of real uploads through the running stack, a fault in the middle, and a verdict.

The verdict counts, per probe (README, "Reliability"):

- lost: a task answered 201 that never reached FINISHED_SUCCESS (our fixture crash
  always retraces), or reached it without its backtrace;
- duplicated: a task with more than one ``task.finished`` event;
- 500s: answers 500 to any request (503 and 507 are documented refusals, not faults);
- stuck: a task not final when the probe's patience ran out after the fault ended;
- recovery: seconds from the fault's end to the next task that finished.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from schemas.messages import TaskFinishedV1, parse
from schemas.topology import EXCHANGE, TASK_FINISHED
from services.common.bus import connect
from services.common.data.db import aware
from services.common.data.intake import TaskStatus, uploads
from tests.data import Data
from tests.integration.stack import Stack, pack_problem_dir

SPY = "retrace.faults.spy"
XZ = {"Content-Type": "application/x-xz-compressed-tar"}


@dataclass
class Verdict:
    """One probe's row of the table."""

    probe: str
    tasks: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    errors_500: int = 0
    stuck: list[str] = field(default_factory=list)
    refused: Counter[int] = field(default_factory=Counter)
    recovery: float | None = None
    seconds: float = 0.0
    leftovers: list[str] = field(default_factory=list)
    """Upload rows, spool folders of no task, or analyzer work folders left behind."""

    def row(self) -> str:
        """``probe | tasks | lost | duplicated | 500s | stuck | time to recover``."""
        recovery = "-" if self.recovery is None else f"{self.recovery:.1f} s"
        return (
            f"| {self.probe} | {self.tasks} | {len(self.lost)} | {len(self.duplicated)} | "
            f"{self.errors_500} | {len(self.stuck)} | {recovery} |"
        )

    @property
    def clean(self) -> bool:
        """Nothing lost, duplicated, stuck, and no 500."""
        return not (self.lost or self.duplicated or self.errors_500 or self.stuck or self.leftovers)


HEADER = (
    "| probe | tasks | lost | duplicated | 500s | stuck | time to recover |\n"
    "| --- | --- | --- | --- | --- | --- | --- |"
)


@dataclass
class Submitted:
    task_id: str
    password: str


class Campaign:
    """Uploads from several threads, the statuses they got, and the events the stack sent."""

    def __init__(self, stack: Stack, problem_dir: Path, work: Path) -> None:
        self.stack = stack
        self.body = pack_problem_dir(problem_dir, work / "crash.tar.xz").read_bytes()
        self.submitted: list[Submitted] = []
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.store = Data.from_url(f"sqlite:///{stack.home}/var/retrace.sqlite3")
        connection = connect(stack.broker_url)
        try:
            channel = connection.channel()
            # Durable and shared, so that it outlives connections the probe closes.
            channel.queue_declare(SPY, durable=True)
            channel.queue_bind(SPY, EXCHANGE, routing_key=TASK_FINISHED.topic)
        finally:
            connection.close()

    def upload(self) -> int:
        """One upload as ABRT's client sends it; the status it got."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.stack.port, timeout=120)
            try:
                conn.request("POST", "/create", body=self.body, headers=XZ)
                answer = conn.getresponse()
                answer.read()
                status = answer.status
                task_id = answer.headers.get("X-Task-Id")
                password = answer.headers.get("X-Task-Password")
            finally:
                conn.close()
        except OSError:
            status, task_id, password = 0, None, None  # no answer at all: the client retries
        with self._lock:
            self.statuses[status] += 1
            if status == 201 and task_id and password:
                self.submitted.append(Submitted(task_id, password))
        return status

    def stream(self, count: int, parallel: int, pause: float = 0.0) -> None:
        """``count`` uploads, ``parallel`` at a time, each thread pausing ``pause`` between."""
        left = iter(range(count))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                self.upload()
                time.sleep(pause)

        threads = [threading.Thread(target=worker) for _ in range(parallel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    @contextmanager
    def streaming(self, count: int, parallel: int, pause: float = 0.0) -> Iterator[None]:
        """Run :meth:`stream` in the background while the block injects its fault."""
        thread = threading.Thread(target=self.stream, args=(count, parallel, pause))
        thread.start()
        try:
            yield
        finally:
            thread.join()

    def judge(self, probe: str, fault_ended: float, patience: float) -> Verdict:
        """Wait up to ``patience`` seconds after ``fault_ended`` (a ``time.time()``) for
        every task to end, then count."""
        started = time.monotonic()
        verdict = Verdict(probe, tasks=len(self.submitted))
        verdict.errors_500 = self.statuses[500]
        verdict.refused = Counter({s: n for s, n in self.statuses.items() if s not in (201, 500)})
        deadline = fault_ended + patience
        pending = {s.task_id for s in self.submitted}
        while pending and time.time() < deadline:
            for task_id in list(pending):
                task = self.store.intake.get_task(task_id)
                if task is not None and task.status.final:
                    pending.discard(task_id)
            time.sleep(0.5)
        verdict.stuck = sorted(pending)
        for submitted in self.submitted:
            if submitted.task_id in pending:
                continue
            if not self._succeeded(submitted):
                verdict.lost.append(submitted.task_id)
        events = self._events()
        verdict.duplicated = sorted(t for t, n in events.items() if n > 1)
        finished = [
            aware(task.finished_at).timestamp()
            for s in self.submitted
            if (task := self.store.intake.get_task(s.task_id)) is not None and task.finished_at
        ]
        after = [moment for moment in finished if moment >= fault_ended]
        verdict.recovery = min(after) - fault_ended if after else None
        verdict.leftovers = self._leftovers(patience=60)
        verdict.seconds = time.monotonic() - started
        return verdict

    def _leftovers(self, patience: float) -> list[str]:
        """What no live process owns, after ``patience`` seconds to clean it up."""
        deadline = time.monotonic() + patience
        while True:
            found = []
            with self.store.engine.connect() as conn:
                rows = conn.execute(sa.select(sa.func.count()).select_from(uploads)).scalar()
            if rows:
                found.append(f"{rows} rows in uploads")
            spool = self.stack.home / "var" / "spool"
            for folder in spool.iterdir() if spool.is_dir() else []:
                if folder.name.startswith(".") or folder.name == "lost+found":
                    continue
                if self.store.intake.get_task(folder.name) is None:
                    found.append(f"spool folder {folder.name} of no task")
            work = self.stack.home / "var" / "cache" / "analyzer" / "work"
            for folder in work.iterdir() if work.is_dir() else []:
                if not folder.name.startswith("."):
                    found.append(f"analyzer work folder {folder.name}")
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(1)

    def _succeeded(self, submitted: Submitted) -> bool:
        task = self.store.intake.get_task(submitted.task_id)
        if task is None or task.status != TaskStatus.SUCCESS:
            return False
        status, _, body = self.stack.request(
            "GET",
            f"/{submitted.task_id}/backtrace",
            headers={"X-Task-Password": submitted.password},
        )
        if status == 500:
            self.statuses[500] += 1
        return status == 200 and b"#0 " in body

    def _events(self) -> Counter[str]:
        """``task.finished`` events per task id, drained from the spy queue."""
        seen: Counter[str] = Counter()
        connection = connect(self.stack.broker_url)
        try:
            channel = connection.channel()
            while True:
                method, _props, body = channel.basic_get(SPY, auto_ack=True)
                if method is None or body is None:
                    break
                seen[parse(TaskFinishedV1, body).task_id] += 1
        finally:
            connection.close()
        return seen


Fault = Callable[[], None]
