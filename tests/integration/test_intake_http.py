"""The intake under gunicorn, through real sockets: what a misbehaving client sees.

The intake runs as ``retrace-intake serve`` on the real RabbitMQ (a private vhost),
once on SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import http.client
import json
import lzma
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from schemas.topology import ANALYZE
from services.common.bus import connect
from services.common.data.intake import TaskStatus, tasks, uploads
from tests.conftest import STORE_KINDS
from tests.data import Data
from tests.fixtures.build import Fixtures
from tests.integration.stack import Stack, free_port
from tests.integration.test_abrt_client import ARCHIVED, client_archive
from tests.unit.test_intake import elf_header, task_dirs
from tests.unit.test_intake_upload import files, real_crash, tar_bytes

pytestmark = pytest.mark.integration

XZ = "application/x-xz-compressed-tar"


class Intake(Stack):
    """Only the intake, with settings of the test's choosing."""

    store_url: str = ""
    extra: str = ""
    serve_args: tuple[str, ...] = ("--workers", "2")

    def write_settings(self) -> None:
        super().write_settings()
        with (self.home / "retrace.toml").open("a") as f:
            f.write(f'[store]\nurl = "{self.store_url}"\n{self.extra}')

    def up(self) -> None:
        self.write_settings()
        for admin in (("migrate",), ("topology",)):
            done = self.command("retrace-admin", *admin)
            assert done.returncode == 0, done.stderr
        self.start("retrace-intake", "serve", "--bind", f"127.0.0.1:{self.port}", *self.serve_args)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(self.logs()) from None
                time.sleep(0.2)

    @property
    def spool(self) -> Path:
        return self.home / "var/spool"


def start_intake(
    home: Path, broker_url: str, store_url: str, extra: str = "", *serve_args: str
) -> Intake:
    intake = Intake(home, broker_url)
    intake.store_url = store_url
    intake.extra = extra
    if serve_args:
        intake.serve_args = serve_args
    intake.up()
    return intake


@pytest.fixture(scope="module", params=STORE_KINDS)
def intake(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
) -> Iterator[Intake]:
    home = tmp_path_factory.mktemp("intake")
    if request.param == "sqlite":
        store_url = f"sqlite:///{home}/retrace.sqlite3"
    else:
        store_url = request.getfixturevalue("make_postgresql_url")()
    stack = start_intake(
        home, make_broker_url(), store_url, "[intake]\nmax_unpacked_size_mib = 64\n"
    )
    yield stack
    stack.down()


def queued_messages(broker_url: str) -> int:
    connection = connect(broker_url)
    try:
        declared = connection.channel().queue_declare(ANALYZE.queue_for("x86_64"), passive=True)
        count = declared.method.message_count
        assert count is not None
        return count
    finally:
        connection.close()


def settle(intake: Intake, store_url: str) -> None:
    """Wait until the intake has finished with every upload, then check it left nothing."""
    store = Data.from_url(store_url)
    try:
        deadline = time.monotonic() + 20
        while True:
            with store.engine.connect() as conn:
                in_flight = conn.execute(uploads.select()).all()
            if not in_flight and not task_dirs(intake.spool):
                break
            assert time.monotonic() < deadline, (in_flight, intake.logs())
            time.sleep(0.1)
        with store.engine.connect() as conn:
            assert conn.execute(tasks.select()).all() == []
    finally:
        store.engine.dispose()
    assert task_dirs(intake.spool) == []
    assert queued_messages(intake.broker_url) == 0


def raw_request(port: int, head: bytes, body: bytes) -> bytes:
    """Send ``head`` and ``body`` on a plain socket; return all the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_a_bomb_is_stopped_and_the_client_reads_the_413_not_a_reset(intake: Intake) -> None:
    core = elf_header() + os.urandom(8 << 20) + bytes(200 << 20)
    body = lzma.compress(tar_bytes([("coredump", core)]), preset=0)
    status, _, text = intake.request("POST", "/create", body, {"Content-Type": XZ})
    assert status == 413, (text, intake.logs())
    assert b"more than 64 MiB" in text
    settle(intake, intake.store_url)


def test_a_client_that_disconnects_halfway_leaves_nothing_behind(
    intake: Intake, crash_fixtures: Fixtures
) -> None:
    body = lzma.compress(tar_bytes(files(real_crash(crash_fixtures))), preset=0)
    head = (
        f"POST /create HTTP/1.1\r\nHost: x\r\nContent-Type: {XZ}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", intake.port), timeout=30) as sock:
        sock.sendall(head + body[: len(body) // 2])
        # The intake is now unpacking and waits for the rest; then the client is gone.
        deadline = time.monotonic() + 20
        while not task_dirs(intake.spool):
            assert time.monotonic() < deadline, intake.logs()
            time.sleep(0.05)
    settle(intake, intake.store_url)


def test_a_plain_tar_that_claims_to_be_small_is_cut_at_its_content_length(
    intake: Intake, crash_fixtures: Fixtures
) -> None:
    body = tar_bytes(files(real_crash(crash_fixtures)))
    head = (
        b"POST /create HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-tar\r\n"
        b"Content-Length: 4096\r\nConnection: close\r\n\r\n"
    )
    answer = raw_request(intake.port, head, body)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"truncated" in answer
    settle(intake, intake.store_url)


def test_a_client_that_stalls_gets_408_at_the_deadline_and_leaves_nothing(
    tmp_path: Path, crash_fixtures: Fixtures, make_broker_url: Callable[[], str]
) -> None:
    store_url = f"sqlite:///{tmp_path}/retrace.sqlite3"
    intake = start_intake(
        tmp_path, make_broker_url(), store_url, "[intake]\nupload_timeout_seconds = 2\n"
    )
    try:
        body = lzma.compress(tar_bytes(files(real_crash(crash_fixtures))), preset=0)
        head = (
            f"POST /create HTTP/1.1\r\nHost: x\r\nContent-Type: {XZ}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", intake.port), timeout=30) as sock:
            sock.sendall(head + body[: len(body) // 2])
            # ... and then nothing more: the intake must not wait for ever.
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), (answer[:300], intake.logs())
        assert b"took longer" in answer
        settle(intake, store_url)
    finally:
        intake.down()


def test_a_clients_second_upload_at_once_is_refused_with_429(
    tmp_path: Path, crash_fixtures: Fixtures, make_broker_url: Callable[[], str]
) -> None:
    store_url = f"sqlite:///{tmp_path}/retrace.sqlite3"
    intake = start_intake(
        tmp_path, make_broker_url(), store_url, "[intake]\nmax_uploads_per_client = 1\n"
    )
    try:
        body = lzma.compress(tar_bytes(files(real_crash(crash_fixtures))), preset=0)
        head = (
            f"POST /create HTTP/1.1\r\nHost: x\r\nContent-Type: {XZ}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", intake.port), timeout=30) as slow:
            slow.sendall(head + body[: len(body) // 2])
            deadline = time.monotonic() + 20
            while not task_dirs(intake.spool):  # the first upload is being received
                assert time.monotonic() < deadline, intake.logs()
                time.sleep(0.05)
            status, headers, text = intake.request("POST", "/create", body, {"Content-Type": XZ})
            assert status == 429, text
            assert int(headers["Retry-After"]) > 0
            assert b"uploads in progress" in text
            slow.sendall(body[len(body) // 2 :])
            assert slow.recv(12) == b"HTTP/1.1 201"
    finally:
        intake.down()


def test_the_optional_files_of_abrts_client_are_accepted_as_it_packs_them(
    tmp_path: Path, crash_fixtures: Fixtures, make_broker_url: Callable[[], str]
) -> None:
    store_url = f"sqlite:///{tmp_path}/retrace.sqlite3"
    intake = start_intake(tmp_path / "home", make_broker_url(), store_url)
    problem = tmp_path / "problem"
    shutil.copytree(crash_fixtures.crash.problem_dir, problem)
    (problem / "rootdir").write_text("/var/lib/machines/f40")
    (problem / "os_release_in_rootdir").write_text("Fedora release 40 (Forty)")
    try:
        # tar c coredump executable package os_release rootdir os_release_in_rootdir | xz -2
        body = client_archive(problem)
        status, headers, text = intake.request("POST", "/create", body, {"Content-Type": XZ})
        assert status == 201, (text, intake.logs())
        crash_dir = intake.spool / headers["X-Task-Id"] / "crash"
        assert sorted(p.name for p in crash_dir.iterdir()) == sorted(ARCHIVED)
        assert (crash_dir / "rootdir").read_text() == "/var/lib/machines/f40"
        # Too long for its cap: refused naming the file, nothing left of it.
        (problem / "rootdir").write_text("/" * 257)
        status, _, text = intake.request(
            "POST", "/create", client_archive(problem), {"Content-Type": XZ}
        )
        assert (status, text) == (403, b"file 'rootdir' is 257 bytes; at most 256\n")
    finally:
        intake.down()


def test_the_heartbeat_sees_the_real_database_broker_and_spool(intake: Intake) -> None:
    status, _, beat = intake.request("GET", "/__heartbeat__")
    assert status == 200, beat
    assert json.loads(beat)["checks"] == {"database": "ok", "broker": "ok", "spool": "ok"}
    status, _, metrics = intake.request("GET", "/metrics")
    assert b"retrace_intake_queue_depth 0.0" in metrics


def test_metrics_sum_every_workers_counts(intake: Intake) -> None:
    def settings_requests() -> float:
        text = intake.request("GET", "/metrics")[2].decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "retrace_intake_requests_total"
                    and sample.labels["route"] == "/settings"
                ):
                    return sample.value
        return 0.0

    before = settings_requests()
    for _ in range(20):  # a new connection each: both workers take some
        assert intake.request("GET", "/settings")[0] == 200
    assert [settings_requests() for _ in range(4)] == [before + 20] * 4


def test_a_declared_length_over_the_limit_is_answered_at_once(intake: Intake) -> None:
    head = (
        f"POST /create HTTP/1.1\r\nHost: x\r\nContent-Type: {XZ}\r\n"
        f"Content-Length: {100 << 20}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", intake.port), timeout=30) as sock:
        sock.sendall(head + bytes(1 << 20))
        answer = b""
        while chunk := sock.recv(65536):  # the server closes: it reads no more of it
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"50 MiB limit" in answer


def test_a_chunked_upload_without_length_is_refused_with_411(intake: Intake) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", intake.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/create",
            body=iter([b"x" * 100]),
            headers={"Content-Type": XZ},
            encode_chunked=True,
        )
        answer = conn.getresponse()
        assert answer.status == 411
        assert b"Content-Length" in answer.read()
    finally:
        conn.close()


def test_the_broker_unreachable_means_503_and_nothing_left(
    tmp_path: Path, crash_fixtures: Fixtures, make_broker_url: Callable[[], str]
) -> None:
    store_url = f"sqlite:///{tmp_path}/retrace.sqlite3"
    intake = start_intake(tmp_path, make_broker_url(), store_url)
    try:
        # The topology exists, but this intake's broker is a port where nothing listens.
        settings = intake.home / "retrace.toml"
        text = settings.read_text()
        settings.write_text(text.replace(intake.broker_url, f"amqp://127.0.0.1:{free_port()}/"))
        intake.down()
        intake.processes.clear()
        intake.start(
            "retrace-intake", "serve", "--bind", f"127.0.0.1:{intake.port}", "--workers", "1"
        )
        body = lzma.compress(tar_bytes(files(real_crash(crash_fixtures))), preset=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                status, headers, text_ = intake.request(
                    "POST", "/create", body, {"Content-Type": XZ}
                )
                break
            except OSError:
                assert time.monotonic() < deadline, intake.logs()
                time.sleep(0.2)
        assert status == 503, (text_, intake.logs())
        assert int(headers["Retry-After"]) > 0
        assert b"queue is unavailable" in text_
        settle(intake, store_url)
        status, _, beat = intake.request("GET", "/__heartbeat__")
        assert status == 503
        assert json.loads(beat)["checks"]["broker"] == "the broker does not answer"
    finally:
        intake.down()


def test_cleanup_command_expires_finished_tasks_and_requeues_stuck_ones(
    tmp_path: Path, crash_fixtures: Fixtures, make_broker_url: Callable[[], str]
) -> None:
    store_url = f"sqlite:///{tmp_path}/retrace.sqlite3"
    intake = start_intake(tmp_path, make_broker_url(), store_url)
    store = Data.from_url(store_url)
    try:
        body = lzma.compress(tar_bytes(files(real_crash(crash_fixtures))), preset=2)
        created = [
            intake.request("POST", "/create", body, {"Content-Type": XZ})[1]["X-Task-Id"]
            for _ in range(2)
        ]
        finished, stuck = created
        long_ago = datetime.now(UTC) - timedelta(days=30)
        with store.engine.begin() as conn:
            conn.execute(
                sa.update(tasks)
                .where(tasks.c.id == finished)
                .values(status=TaskStatus.SUCCESS, finished_at=long_ago)
            )
            conn.execute(
                sa.update(tasks)
                .where(tasks.c.id == stuck)
                .values(status=TaskStatus.SUBMITTING, created_at=long_ago)
            )
        done = intake.command("retrace-intake", "cleanup")
        assert done.returncode == 0, done.stderr
        assert "expired 1" in done.stdout
        assert "republished 1" in done.stdout
        assert store.intake.get_task(finished) is None
        assert not (intake.spool / finished).exists()
        requeued = store.intake.get_task(stuck)
        assert requeued is not None
        assert requeued.status == TaskStatus.QUEUED
        # Both uploads' commands and the republished one are in the queue.
        assert queued_messages(intake.broker_url) == 3
    finally:
        store.engine.dispose()
        intake.down()


def test_behind_a_trusted_proxy_with_https_required(
    tmp_path: Path, make_broker_url: Callable[[], str]
) -> None:
    # The production gunicorn config; nginx would connect from 127.0.0.2.
    intake = start_intake(
        tmp_path,
        make_broker_url(),
        f"sqlite:///{tmp_path}/retrace.sqlite3",
        '[intake]\nrequire_https = true\ntrusted_proxies = ["127.0.0.2/32"]\n',
        "--config",
        str(Path(__file__).resolve().parents[2] / "deploy/gunicorn.conf.py"),
        "--workers",
        "1",
    )

    def get(source: str, headers: dict[str, str]) -> int:
        conn = http.client.HTTPConnection(
            "127.0.0.1", intake.port, timeout=30, source_address=(source, 0)
        )
        try:
            conn.request("GET", "/settings", headers=headers)
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.5"}
        assert get("127.0.0.2", https) == 200
        assert get("127.0.0.2", {}) == 403
        # A client that is not the proxy cannot claim HTTPS, neither to us nor to gunicorn.
        assert get("127.0.0.1", https) == 403
        assert get("127.0.0.1", {}) == 403
    finally:
        intake.down()


@pytest.mark.parametrize("store_kind", STORE_KINDS)
def test_two_workers_write_the_store_safely_at_once(
    request: pytest.FixtureRequest,
    store_kind: str,
    tmp_path: Path,
    crash_fixtures: Fixtures,
    make_broker_url: Callable[[], str],
) -> None:
    if store_kind == "sqlite":
        store_url = f"sqlite:///{tmp_path}/retrace.sqlite3"
    else:
        store_url = request.getfixturevalue("make_postgresql_url")()
    intake = start_intake(
        tmp_path,
        make_broker_url(),
        store_url,
        "[intake]\nmax_uploads_per_client = 8\nwrong_password_limit = 5\n",
        "--workers",
        "2",
    )
    store = Data.from_url(store_url)
    body = lzma.compress(tar_bytes(files(real_crash(crash_fixtures))), preset=2)

    def upload() -> tuple[int, str, str]:
        status, headers, _ = intake.request("POST", "/create", body, {"Content-Type": XZ})
        return status, headers.get("X-Task-Id", ""), headers.get("X-Task-Password", "")

    def status_of(task_id: str, password: str) -> tuple[int, str]:
        # Exactly the password given (Stack.request would follow rotations).
        conn = http.client.HTTPConnection("127.0.0.1", intake.port, timeout=30)
        try:
            conn.request("GET", f"/{task_id}", headers={"X-Task-Password": password})
            answer = conn.getresponse()
            answer.read()
            return answer.status, answer.headers.get("X-Task-Password", "")
        finally:
            conn.close()

    try:
        with ThreadPoolExecutor(6) as pool:
            created = list(pool.map(lambda _: upload(), range(6)))
        assert [status for status, _, _ in created] == [201] * 6, intake.logs()
        _, task_id, password = created[0]
        with ThreadPoolExecutor(8) as pool:
            wrong = list(pool.map(lambda _: status_of(task_id, "x" * 32)[0], range(12)))
        # Every worker counted into the same row: exactly five 403s, then 429s.
        assert sorted(wrong) == [403] * 5 + [429] * 7, intake.logs()
        # The right password is still accepted; two requests racing with it across both
        # workers both succeed and agree on the next password.
        with ThreadPoolExecutor(2) as pool:
            raced = list(pool.map(lambda _: status_of(task_id, password), range(2)))
        assert [status for status, _ in raced] == [200, 200], intake.logs()
        assert raced[0][1] == raced[1][1]
        assert status_of(task_id, raced[0][1])[0] == 200
        assert queued_messages(intake.broker_url) == 6
    finally:
        store.engine.dispose()
        intake.down()
