"""Leases on running tasks: lost connections neither retrace a task twice nor fail it.

RabbitMQ 3.10 counts a delivery returned because its connection closed toward the
quorum queue's delivery limit, as it counts a failure (checked on the local broker:
with a limit of 2 the third return of either kind dead-letters the command).  The
store is real (SQLite); the broker is replaced by lists of what would be sent.
tests/faults closes every broker connection of a running stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.messages import AnalyzeTaskV1, Message
from schemas.topology import ANALYZE_WAIT, Route, WaitRoute
from services.analyzer.deadletters import DeadLetterHandler
from services.analyzer.rootcache import RootCache
from services.analyzer.worker import MAX_LEASE_WAITS, AnalyzeHandler
from services.common.bus import Delivery
from services.common.data.intake import TaskStatus
from services.common.settings import AnalyzerSettings
from services.common.spool import Spool
from tests.data import Data

TASK = "lease-task-01"
OTHER = "other-host:4242"
DEAD_LETTERED = {"x-first-death-reason": "delivery_limit", "x-death": []}


class Bus:
    def __init__(self) -> None:
        self.events: list[Message] = []
        self.parked: list[tuple[int, Message]] = []

    def publish(self, _route: Route, message: Message, _arch: str | None) -> None:
        self.events.append(message)

    def later(self, wait: WaitRoute, seconds: int, message: Message, _arch: str | None) -> None:
        assert wait is ANALYZE_WAIT
        self.parked.append((seconds, message))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Data]:
    store = Data.from_url(f"sqlite:///{tmp_path}/retrace.sqlite3")
    store.migrate()
    store.intake.create_task(TASK, "digest", "x86_64", "retrace", "queued")
    yield store
    store.engine.dispose()


def held(store: Data, age: float, owner: str = OTHER) -> None:
    """The task running on ``owner``, whose lease was last renewed ``age`` seconds ago."""
    when = datetime.now(UTC) - timedelta(seconds=age)
    assert store.intake.move_task(
        TASK, [TaskStatus.SUBMITTING], TaskStatus.RUNNING, lease_owner=owner, lease_at=when
    )


def command(waits: int = 0) -> AnalyzeTaskV1:
    return AnalyzeTaskV1(task_id=TASK, arch="x86_64", lease_waits=waits)


def dead_letters(tmp_path: Path, store: Data, bus: Bus) -> DeadLetterHandler:
    return DeadLetterHandler(store.intake, Spool(tmp_path / "spool"), bus.publish, bus.later, 30)


def test_a_command_given_up_on_after_lost_connections_waits_for_the_live_analyzer(
    tmp_path: Path, store: Data
) -> None:
    held(store, age=5)
    bus = Bus()
    dead_letters(tmp_path, store, bus)(command().model_dump_json().encode(), DEAD_LETTERED)
    task = store.intake.get_task(TASK)
    assert task is not None
    assert task.status == TaskStatus.RUNNING  # not failed
    assert [(s, m.lease_waits) for s, m in bus.parked] == [(30, 1)]  # type: ignore[attr-defined]
    assert bus.events == []


@pytest.mark.parametrize(
    ("age", "waits"), [(120, 0), (5, MAX_LEASE_WAITS)], ids=["lease-expired", "waited-enough"]
)
def test_a_command_whose_analyzers_died_or_failed_fails_its_task(
    tmp_path: Path, store: Data, age: float, waits: int
) -> None:
    held(store, age=age)
    bus = Bus()
    dead_letters(tmp_path, store, bus)(command(waits).model_dump_json().encode(), DEAD_LETTERED)
    task = store.intake.get_task(TASK)
    assert task is not None
    assert task.status == TaskStatus.FAILURE
    assert bus.parked == []
    assert len(bus.events) == 1


def test_a_redelivered_command_waits_while_another_live_analyzer_holds_its_task(
    tmp_path: Path, store: Data
) -> None:
    held(store, age=5)
    bus = Bus()
    spool = Spool(tmp_path / "spool")
    spool.crash_dir(TASK).mkdir(parents=True)
    handler = AnalyzeHandler(
        AnalyzerSettings(lease_seconds=30),
        store.intake,
        store.analyzer,
        store.mirror,
        spool,
        RootCache(tmp_path / "cache", tmp_path / "repo"),
        bus.publish,
        tmp_path / "cache" / "work",
        bus.later,
    )
    handler(Delivery(command(), True, {}, "message-1"))
    task = store.intake.get_task(TASK)
    assert task is not None
    assert (task.status, task.lease_owner) == (TaskStatus.RUNNING, OTHER)  # left alone
    assert [(s, m.lease_waits) for s, m in bus.parked] == [(30, 1)]  # type: ignore[attr-defined]


def test_a_lease_is_renewed_only_by_its_owner_and_given_up_at_the_end(store: Data) -> None:
    held(store, age=25)
    assert not store.intake.renew_lease(TASK, "someone-else:1")
    assert store.intake.renew_lease(TASK, OTHER)
    task = store.intake.get_task(TASK)
    assert task is not None
    assert task.lease_at is not None
    assert task.held_by_other("me:1", datetime.now(UTC) - timedelta(seconds=2))
    assert not task.held_by_other(OTHER, datetime.now(UTC) - timedelta(seconds=2))
    store.intake.release_lease(TASK, OTHER)
    task = store.intake.get_task(TASK)
    assert task is not None
    assert (task.lease_owner, task.lease_at) == (None, None)
