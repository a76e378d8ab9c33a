"""Mirror commands the broker gives up on: the worker's dead-letter consumer fails the build.

The broker's policy is applied through the management API, as ``retrace-admin
policies`` does in production, with a delivery limit of one return.  Only the
mirror worker runs; Koji is the stand-in of koji_hub.py.  Also how the worker sorts
failures: Koji unreachable is waited out, a bad download is retried
``download_attempts`` (here 2) times, an unexpected error up to the delivery limit.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import falcon.testing
import pytest

from schemas.messages import MirrorBuildV1
from schemas.topology import EXCHANGE, MIRROR_BUILD
from services.common.bus import connect, properties_for
from services.common.data.mirror import KojiBuild
from services.mirror.http import create_app
from tests.data import Data
from tests.integration.koji_hub import KojiStandIn, build_rpms
from tests.integration.stack import Stack, wait_build

pytestmark = pytest.mark.integration

POISON, REFUSED, ERROR_PAGE, CUT_SHORT, BUGGY, OUTAGE = 301, 302, 303, 304, 305, 306


class Worker:
    def __init__(self, stack: Stack, koji: KojiStandIn) -> None:
        self.stack = stack
        self.koji = koji
        self.store = Data.from_url(f"sqlite:///{stack.home}/var/retrace.sqlite3")
        self.started = 0
        self.process = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        self.started += 1
        return self.stack.start("retrace-mirror", "worker", log_name=f"worker-{self.started}")

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to settle its command, as if the host died."""
        self.process.kill()
        self.process.wait(timeout=30)
        self.stack.processes.remove(self.process)

    def restart(self) -> None:
        self.process = self.start()

    def wait_build(self, build_id: int, state: str, timeout: float = 60) -> KojiBuild:
        return wait_build(self.stack, self.store, build_id, state, timeout)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        self.stack.wait_log(text, timeout)


def mirror_stack(root: Path, broker_url: str, koji: KojiStandIn) -> Stack:
    settings = (
        f'[mirror]\nkoji_hub = "{koji.hub_url}"\nkoji_topurl = "{koji.top_url}"\n'
        "retry_delays = [1, 2]\nkoji_timeout = 10\ndownload_attempts = 2\n"
    )
    stack = Stack(
        root,
        broker_url,
        overrides={"RETRACE_BROKER__DELIVERY_LIMIT": "1"},
        extra_settings=settings,
    )
    stack.write_settings()
    for admin in (("migrate",), ("topology",)):
        done = stack.command("retrace-admin", *admin)
        assert done.returncode == 0, done.stderr
    return stack


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, make_broker_url: Callable[[], str]
) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("mirror-dead-letters")
    koji = KojiStandIn(root / "koji").start()
    stack = mirror_stack(root / "home", make_broker_url(), koji)
    applied = stack.command("retrace-admin", "policies")
    assert applied.returncode == 0, applied.stderr
    worker = Worker(stack, koji)
    worker.wait_log("retrace.dead-letter.mirror.build")  # consuming it
    yield worker
    koji.release_stalls.set()
    stack.down()
    koji.stop()


def test_a_command_that_keeps_killing_the_worker_fails_its_build(worker: Worker) -> None:
    rpms = build_rpms(worker.stack.home.parent, "poison", 1, size_kib=4096)
    worker.koji.add_build(POISON, rpms)
    worker.koji.stall[rpms[0].name] = 2
    queued = worker.stack.command("retrace-mirror", "sync", "--build", str(POISON))
    assert queued.returncode == 0, queued.stderr
    for _ in range(2):  # the delivery limit is one return: the second one dead-letters it
        assert worker.koji.stalled.wait(60), worker.stack.logs()
        worker.koji.stalled.clear()
        worker.kill()
        worker.restart()
    build = worker.wait_build(POISON, "failed")
    assert build.nvr == "poison-1.0-1.fc40"
    assert build.reason is not None
    assert "given up after its worker stopped on every attempt" in build.reason
    assert "delivery_limit on retrace.mirror.build" in build.reason
    worker.wait_log(f"mirroring build poison-1.0-1.fc40 ({POISON}) failed")
    assert rpms[0].name not in worker.koji.downloads  # never fetched whole, never placed
    assert worker.process.poll() is None, worker.stack.logs()
    # The mirror's /metrics shows it to whoever watches the mirror.
    app = create_app(worker.store.mirror, worker.stack.home / "var" / "repo")
    metrics = falcon.testing.TestClient(app).simulate_get("/metrics").text
    assert 'retrace_mirror_builds{state="failed"} 1' in metrics


def _publish_raw(broker_url: str, body: bytes) -> None:
    connection = connect(broker_url)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        props = properties_for(MIRROR_BUILD, MirrorBuildV1(build=1))
        channel.basic_publish(EXCHANGE, MIRROR_BUILD.topic, body, props, mandatory=True)
    finally:
        connection.close()


def test_a_malformed_command_is_dead_lettered_at_once_and_logged(worker: Worker) -> None:
    worker.koji.add_build(REFUSED, build_rpms(worker.stack.home.parent, "refused", 1))
    calls = len(worker.koji.calls)
    _publish_raw(worker.stack.broker_url, b'{"build": 302, "action": "explode"}')
    build = worker.wait_build(REFUSED, "failed")
    assert build.reason is not None
    assert "refused" in build.reason
    assert "(RabbitMQ: rejected on retrace.mirror.build" in build.reason
    assert "rejecting a malformed retrace.mirror.build.v1 message" in worker.stack.logs()
    # Dead-lettered at its first delivery: the worker never asked Koji to mirror it.
    assert "listRPMs" not in worker.koji.calls[calls:]

    _publish_raw(worker.stack.broker_url, b"not json at all")
    worker.wait_log("dropping a dead-lettered mirror command that names no build")


def test_the_worker_and_the_intake_warn_when_the_broker_lacks_the_policy(
    tmp_path: Path, make_broker_url: Callable[[], str], worker: Worker
) -> None:
    stack = mirror_stack(tmp_path / "home", make_broker_url(), worker.koji)
    stack.start("retrace-mirror", "worker", log_name="unprotected-worker")
    stack.start(
        "retrace-intake",
        "serve",
        "--bind",
        f"127.0.0.1:{stack.port}",
        "--workers",
        "1",
        log_name="unprotected-intake",
    )
    missing = "the broker has no 'retrace-commands' policy"
    try:
        deadline = time.monotonic() + 30
        while stack.logs().count(missing) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        for name in ("unprotected-worker", "unprotected-intake"):
            assert missing in (stack.home / f"{name}.log").read_text(), stack.logs()
    finally:
        stack.down()


def metrics_of(worker: Worker) -> str:
    """The mirror's ``/metrics``, as ``retrace-mirror serve`` answers it."""
    app = create_app(worker.store.mirror, worker.stack.home / "var" / "repo")
    return str(falcon.testing.TestClient(app).simulate_get("/metrics").text)


def sync(worker: Worker, build_id: int) -> None:
    queued = worker.stack.command("retrace-mirror", "sync", "--build", str(build_id))
    assert queued.returncode == 0, queued.stderr


def test_an_error_page_answered_for_an_rpm_is_retried_not_failed(worker: Worker) -> None:
    rpms = build_rpms(worker.stack.home.parent, "errorpage", 1)
    worker.koji.add_build(ERROR_PAGE, rpms)
    worker.koji.html[rpms[0].name] = 1
    sync(worker, ERROR_PAGE)
    worker.wait_build(ERROR_PAGE, "mirrored")
    logs = worker.stack.logs()
    assert "is not an RPM (text/html): no RPM lead; not placed" in logs
    assert f"build {ERROR_PAGE}, attempt 1 failed, retrying in 1 s" in logs
    placed = worker.stack.home / "var/repo/fedora-40/noarch/Packages" / rpms[0].name
    assert placed.read_bytes() == rpms[0].read_bytes()


def test_a_download_cut_short_every_time_is_dead_lettered_with_the_reason(
    worker: Worker,
) -> None:
    rpms = build_rpms(worker.stack.home.parent, "cutshort", 1)
    worker.koji.add_build(CUT_SHORT, rpms)
    worker.koji.truncate[rpms[0].name] = 99
    try:
        sync(worker, CUT_SHORT)
        build = worker.wait_build(CUT_SHORT, "failed")
    finally:
        worker.koji.truncate.clear()
    assert build.reason is not None
    assert f"Mirroring build {CUT_SHORT} was given up: 2 attempts" in build.reason
    assert "were bad; the last: " in build.reason
    assert "was cut short" in build.reason
    assert worker.stack.logs().count(f"build {CUT_SHORT}, attempt 1 failed, retrying in 1 s") == 1
    assert not list((worker.stack.home / "var/repo").rglob(rpms[0].name))


def test_an_unexpected_error_is_retried_up_to_the_delivery_limit_then_dead_lettered(
    worker: Worker,
) -> None:
    worker.koji.add_build(BUGGY, build_rpms(worker.stack.home.parent, "buggy", 1))
    worker.koji.malformed.add(BUGGY)  # no payloadhash: the fetcher's KeyError
    calls = len(worker.koji.calls)
    sync(worker, BUGGY)
    build = worker.wait_build(BUGGY, "failed")
    assert build.reason is not None
    assert "failed unexpectedly on 2 deliveries; the last: KeyError('payloadhash')" in build.reason
    # The delivery limit is one return: two deliveries in all, each with its traceback.
    assert worker.koji.calls[calls:].count("listRPMs") == 2
    logs = worker.stack.logs()
    assert f"build {BUGGY} failed unexpectedly on delivery 1 of at most 2; requeued" in logs
    assert f"build {BUGGY} failed unexpectedly on delivery 2, the last" in logs
    assert logs.count("KeyError: 'payloadhash'") >= 2
    assert worker.process.poll() is None


def test_koji_unreachable_is_waited_out_never_dead_lettered_and_shown(worker: Worker) -> None:
    worker.koji.add_build(OUTAGE, build_rpms(worker.stack.home.parent, "outage", 1))
    worker.koji.down = True
    try:
        sync(worker, OUTAGE)
        # Three attempts: beyond both the delivery limit and download_attempts.
        worker.wait_log(f"build {OUTAGE}, attempt 3 failed, retrying in 2 s")
        metrics = metrics_of(worker)
        assert "retrace_mirror_koji_up 0" in metrics
        assert "retrace_mirror_koji_last_failure_timestamp_seconds 1" in metrics
        assert worker.store.mirror.find_build("outage-1.0-1.fc40") is None
    finally:
        worker.koji.down = False
    worker.wait_build(OUTAGE, "mirrored")
    assert "retrace_mirror_koji_up 1" in metrics_of(worker)
