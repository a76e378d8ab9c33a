"""Which copy of a waiting task's command runs it: the rules of services/analyzer/fetch.py.

The store is real (SQLite); the broker is replaced by lists of what would be sent.
test_analyzer_fetch.py (integration) runs the same paths on RabbitMQ with the mirror.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.messages import AnalyzeTaskV1, Message, MirrorBuildV1
from schemas.topology import ANALYZE_WAIT, MIRROR_BUILD, Route, WaitRoute
from services.analyzer.fetch import Fetches
from services.common.bus import Delivery
from services.common.data.intake import TaskStatus
from services.common.settings import AnalyzerSettings
from tests.data import Data

NVR = "crasher-1.0-2.fc40"


class Bus:
    def __init__(self) -> None:
        self.requests: list[Message] = []
        self.parked: list[tuple[int, Message]] = []

    def publish(self, route: Route, message: Message, _arch: str | None) -> None:
        assert route is MIRROR_BUILD
        self.requests.append(message)

    def later(self, wait: WaitRoute, seconds: int, message: Message, _arch: str | None) -> None:
        assert wait is ANALYZE_WAIT
        self.parked.append((seconds, message))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Data]:
    store = Data.from_url(f"sqlite:///{tmp_path}/retrace.sqlite3")
    store.migrate()
    store.intake.create_task("waiting-1", "digest", "x86_64", "retrace", "queued")
    yield store
    store.engine.dispose()


def copy(attempt: int, token: str, *, redelivered: bool = False) -> Delivery:
    command = AnalyzeTaskV1(task_id="waiting-1", arch="x86_64", fetch_attempt=attempt)
    return Delivery(command, redelivered, {}, token)


def test_only_the_first_copy_of_the_last_wait_runs_a_parked_task(store: Data) -> None:
    bus = Bus()
    settings = AnalyzerSettings(fetch_wait_seconds=30, fetch_attempts=2)
    fetches = Fetches(settings, store.analyzer, bus.publish, bus.later)
    assert fetches.admit(copy(0, "intake"))
    assert store.intake.move_task("waiting-1", [TaskStatus.SUBMITTING], TaskStatus.RUNNING)

    fetches.park(AnalyzeTaskV1(task_id="waiting-1", arch="x86_64"), NVR)
    [request] = bus.requests
    assert isinstance(request, MirrorBuildV1)
    assert request.build == NVR
    [(seconds, retry)] = bus.parked
    assert seconds == 30
    assert isinstance(retry, AnalyzeTaskV1)
    assert retry.fetch_attempt == 1

    # The intake's command again, as a duplicate: stale, nothing happens.
    assert not fetches.admit(copy(0, "intake"))
    assert len(bus.parked) == 1
    # Redelivered, its analyzer may have died before parking the copy: park it again.
    assert not fetches.admit(copy(0, "intake", redelivered=True))
    assert len(bus.parked) == 2
    assert len(bus.requests) == 2

    assert fetches.admit(copy(1, "republished"))
    assert not fetches.admit(copy(1, "from-the-wait-queue"))
    assert fetches.admit(copy(1, "republished", redelivered=True))
    assert not fetches.admit(copy(0, "intake", redelivered=True))
    assert len(bus.parked) == 2
