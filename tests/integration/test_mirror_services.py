"""The mirror as deployed: ``retrace-mirror listen`` and ``worker`` as processes.

Koji's messages are real ``BuildStateChangeV1`` messages on a broker of their own
(a vhost of the local RabbitMQ standing in for Fedora's), Koji is the stand-in
of koji_hub.py, and the crash at the end goes through intake and analyzer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from koji_fedoramessaging_messages.build import BuildStateChangeV1

from services.common.bus import connect
from services.common.data.mirror import KojiBuild
from tests.data import Data
from tests.fixtures.build import Fixtures
from tests.integration.broker import close_connections, connections_of
from tests.integration.koji_hub import KojiStandIn, build_rpms
from tests.integration.stack import Stack, pack_problem_dir, wait_build

pytestmark = pytest.mark.integration

PREFIX = "org.fedoraproject.prod"
CRASHER, GLIBC, FILESYSTEM = 201, 202, 203
IGNORED, DROPPED, LATE, OUTAGE, INTERRUPTED, TAGGED = 204, 205, 206, 207, 208, 209
RECONNECTED = 210


class Mirror:
    def __init__(self, stack: Stack, koji: KojiStandIn, koji_broker: str) -> None:
        self.stack = stack
        self.koji = koji
        self.koji_broker = koji_broker
        self.store = Data.from_url(f"sqlite:///{stack.home}/var/retrace.sqlite3")
        self.listener = stack.start("retrace-mirror", "listen", log_name="mirror-listen")
        self.worker = stack.start("retrace-mirror", "worker", log_name="mirror-worker")

    def restart_listener(self) -> None:
        self.listener.terminate()
        self.listener.wait(timeout=30)
        self.stack.processes.remove(self.listener)
        self.listener = self.stack.start("retrace-mirror", "listen", log_name="mirror-listen-2")

    def announce(self, build_id: int, new: int, attribute: str = "state", old: int = 0) -> None:
        """Publish Koji's message about a build, as Koji's fedora-messaging plugin does."""
        build = self.koji.builds[build_id]
        message = BuildStateChangeV1(
            topic=f"{PREFIX}.buildsys.build.state.change",
            body={
                "name": build.name,
                "version": build.version,
                "release": build.release,
                "epoch": None,
                "attribute": attribute,
                "old": old,
                "new": new,
                "build_id": build.id,
                "task_id": build.id * 10,
                "task": None,
                "request": None,
                "owner": build.owner,
                "instance": "primary",
                "creation_time": datetime.now(UTC).isoformat(),
                "completion_time": datetime.now(UTC).isoformat() if new == 1 else None,
            },
        )
        message.validate()
        connection = connect(self.koji_broker)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                "amq.topic",
                message._encoded_routing_key,
                message._encoded_body,
                message._properties,
            )
        finally:
            connection.close()

    def wait_build(self, build_id: int, state: str, timeout: float = 60) -> KojiBuild:
        return wait_build(self.stack, self.store, build_id, state, timeout)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        self.stack.wait_log(text, timeout)


def wait_listening(mirror: Mirror, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while mirror.stack.logs().count("catch-up") < count and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def mirror(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
) -> Iterator[Mirror]:
    root = tmp_path_factory.mktemp("mirror-services")
    koji = KojiStandIn(root / "koji").start()
    by_source: dict[str, list[Path]] = {}
    for rpm in crash_fixtures.rpms:
        by_source.setdefault(rpm.sourcerpm, []).append(rpm.path)
    for build_id, name in ((CRASHER, "crasher"), (GLIBC, "glibc"), (FILESYSTEM, "filesystem")):
        source = next(s for s in by_source if s.startswith(f"{name}-"))
        koji.add_build(build_id, by_source[source])
    koji.add_build(IGNORED, build_rpms(root, "ignored", 1))
    koji.add_build(DROPPED, build_rpms(root, "dropped", 2))
    koji_broker = make_broker_url()
    settings = (
        f'[mirror]\nkoji_hub = "{koji.hub_url}"\nkoji_topurl = "{koji.top_url}"\n'
        f'koji_broker_url = "{koji_broker}"\nkoji_topic_prefix = "{PREFIX}"\n'
        "delete_on_deleted = true\nretry_delays = [1, 2]\ncatch_up_interval = 600\n"
        "koji_timeout = 10\n"
    )
    stack = Stack(root / "home", make_broker_url(), extra_settings=settings)
    stack.up()
    mirror = Mirror(stack, koji, koji_broker)
    wait_listening(mirror)
    yield mirror
    stack.down()
    koji.stop()


def test_only_a_completed_build_is_mirrored(mirror: Mirror) -> None:
    mirror.announce(IGNORED, new=0, old=None)  # type: ignore[arg-type]  # BUILDING
    mirror.announce(IGNORED, new=1, attribute="owner")
    mirror.announce(IGNORED, new=3)  # FAILED
    mirror.announce(IGNORED, new=4)  # CANCELED
    mirror.announce(DROPPED, new=1)
    mirror.wait_build(DROPPED, "mirrored")
    assert mirror.store.mirror.get_build(IGNORED) is None
    logs = mirror.stack.logs()
    assert "its new state is BUILDING" in logs
    assert "a change of 'owner', not of the state" in logs
    assert "its new state is FAILED" in logs
    assert "its new state is CANCELED" in logs
    assert "ignored-" not in "".join(mirror.koji.downloads)


def test_a_deleted_build_is_removed_where_configured(mirror: Mirror) -> None:
    mirror.wait_build(DROPPED, "mirrored")
    repo = mirror.stack.home / "var" / "repo"
    assert list(repo.rglob("dropped-*.rpm"))
    mirror.announce(DROPPED, new=2, old=1)
    mirror.wait_build(DROPPED, "removed")
    assert not list(repo.rglob("dropped-*.rpm"))
    assert [
        p for p in mirror.store.mirror.all_packages() if p.nevra.name.startswith("dropped")
    ] == []


def test_koji_down_then_up_is_retried_with_backoff(mirror: Mirror) -> None:
    mirror.koji.add_build(OUTAGE, build_rpms(mirror.stack.home.parent, "outage", 1))
    mirror.koji.down = True
    refused = mirror.koji.refused
    try:
        queued = mirror.stack.command("retrace-mirror", "sync", "--build", str(OUTAGE))
        assert queued.returncode == 0, queued.stderr
        mirror.wait_log("attempt 3 failed, retrying in 2 s")
    finally:
        mirror.koji.down = False
    # Three attempts over three seconds: a backoff, not a hot loop.
    assert mirror.koji.refused - refused <= 4
    mirror.wait_build(OUTAGE, "mirrored")


def test_an_unknown_build_is_rejected_not_retried(mirror: Mirror) -> None:
    queued = mirror.stack.command("retrace-mirror", "sync", "--build", "424242")
    assert queued.returncode == 0, queued.stderr
    mirror.wait_log("Koji has no build 424242")
    calls = mirror.koji.calls.count("getBuild")
    time.sleep(2)
    assert mirror.koji.calls.count("getBuild") == calls


def test_listener_and_worker_survive_their_connections_being_closed(mirror: Mirror) -> None:
    """Every connection on Koji's broker (the fedora-messaging listener's) and on ours
    (the worker's consumer, the listener's publisher) is closed; without a restart, the
    next build Koji announces is mirrored."""
    mirror.koji.add_build(RECONNECTED, build_rpms(mirror.stack.home.parent, "reconnected", 1))
    assert close_connections(mirror.koji_broker) >= 1
    assert close_connections(mirror.stack.broker_url) >= 1
    # The fedora-messaging consumer is back when Koji's broker lists its connection again.
    deadline = time.monotonic() + 60
    while not connections_of(mirror.koji_broker) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # its queue consumer is set up just after the connection opens
    mirror.announce(RECONNECTED, new=1)
    mirror.wait_build(RECONNECTED, "mirrored", timeout=90)
    assert mirror.listener.poll() is None
    assert mirror.worker.poll() is None
    assert "lost the broker" in (mirror.stack.home / "mirror-worker.log").read_text()


def test_builds_completed_while_the_listener_was_down_are_caught_up(mirror: Mirror) -> None:
    mirror.listener.terminate()
    mirror.listener.wait(timeout=30)
    mirror.koji.add_build(LATE, build_rpms(mirror.stack.home.parent, "late", 2))
    mirror.restart_listener()
    mirror.wait_build(LATE, "mirrored")
    caught_up = (mirror.stack.home / "mirror-listen-2.log").read_text()
    assert "builds completed since the last seen" in caught_up
    assert "late-1.0-1.fc40" not in (mirror.stack.home / "mirror-listen.log").read_text()


def test_an_interrupted_download_leaves_nothing_and_is_redone(mirror: Mirror) -> None:
    rpms = build_rpms(mirror.stack.home.parent, "interrupted", 1, size_kib=4096)
    mirror.koji.add_build(INTERRUPTED, rpms)
    name = rpms[0].name
    mirror.koji.stall[name] = 1
    queued = mirror.stack.command("retrace-mirror", "sync", "--build", "interrupted-1.0-1.fc40")
    assert queued.returncode == 0, queued.stderr
    assert mirror.koji.stalled.wait(60), mirror.stack.logs()
    mirror.worker.kill()  # no chance to clean up: as if the machine went down
    mirror.worker.wait(timeout=30)
    mirror.koji.release_stalls.set()
    repo = mirror.stack.home / "var" / "repo"
    assert [p for p in repo.rglob(name) if ".incoming" not in p.parts] == []
    mirror.stack.processes.remove(mirror.worker)
    mirror.worker = mirror.stack.start("retrace-mirror", "worker", log_name="mirror-worker-2")
    mirror.wait_build(INTERRUPTED, "mirrored")
    placed = repo / "fedora-40" / "noarch" / "Packages" / name
    assert placed.read_bytes() == rpms[0].read_bytes()
    assert not list((repo / ".incoming").iterdir())


def test_sync_backfills_a_tag_and_a_date(mirror: Mirror) -> None:
    since = datetime.now(UTC).isoformat()
    mirror.koji.add_build(
        TAGGED, build_rpms(mirror.stack.home.parent, "tagged", 1), tags=("f40-updates",)
    )
    by_tag = mirror.stack.command("retrace-mirror", "sync", "--tag", "f40-updates")
    assert by_tag.returncode == 0, by_tag.stderr
    assert "1 builds queued" in by_tag.stdout
    mirror.wait_build(TAGGED, "mirrored")
    by_date = mirror.stack.command("retrace-mirror", "sync", "--since", since)
    assert by_date.returncode == 0, by_date.stderr
    assert f"queued: mirror build {TAGGED}" in by_date.stdout
    assert "1 builds queued" in by_date.stdout


def test_a_crash_of_a_build_announced_by_koji_is_retraced(
    mirror: Mirror, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    for build_id in (FILESYSTEM, GLIBC, CRASHER):
        mirror.announce(build_id, new=1)
    for build_id in (FILESYSTEM, GLIBC, CRASHER):
        mirror.wait_build(build_id, "mirrored")
    repo = mirror.stack.home / "var" / "repo" / "fedora-40" / "x86_64"
    assert (repo / "repodata" / "repomd.xml").exists()
    body = pack_problem_dir(crash_fixtures.crash.problem_dir, tmp_path / "crash.tar.xz")
    status, headers, text = mirror.stack.request(
        "POST", "/create", body.read_bytes(), {"Content-Type": "application/x-xz-compressed-tar"}
    )
    assert status == 201, text
    task_id, password = headers["X-Task-Id"], headers["X-Task-Password"]
    assert mirror.stack.wait_finished(task_id, password) == "FINISHED_SUCCESS", mirror.stack.logs()
    _, _, backtrace = mirror.stack.request(
        "GET", f"/{task_id}/backtrace", headers={"X-Task-Password": password}
    )
    crash = crash_fixtures.crash
    assert f"in {crash.function} (" in backtrace.decode()
    assert f"at {crash.source_file}:{crash.line}" in backtrace.decode()
