"""Faults through the real intake (``retrace-intake serve``, gunicorn, real sockets).

A full spool (a real 8 MiB tmpfs), a body cut short, a refused client still sending,
idle and trickling sockets, and an intake worker SIGKILLed mid-upload: each answer is
the documented one, never a 500, and nothing is left behind.
"""

from __future__ import annotations

import http.client
import lzma
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.common.data.intake import uploads
from tests.data import Data
from tests.integration.test_intake_http import XZ, Intake, settle, start_intake
from tests.unit.test_intake import elf_header, task_dirs
from tests.unit.test_intake_upload import Member, tar_bytes

pytestmark = pytest.mark.integration


def crash(core_size: int) -> bytes:
    core = elf_header() + os.urandom(core_size)
    files: list[Member] = [
        ("coredump", core),
        ("executable", b"/usr/bin/crasher"),
        ("package", b"crasher-1.0-1.fc40"),
    ]
    return lzma.compress(tar_bytes(files), preset=0)


def head(length: int) -> bytes:
    return (
        f"POST /create HTTP/1.1\r\nHost: x\r\nContent-Type: {XZ}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


def read_all(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def wait_for(what: Callable[[], object], timeout: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why()
        time.sleep(0.05)


def upload_rows(store_url: str) -> list[sa.Row[object]]:
    store = Data.from_url(store_url)
    try:
        with store.engine.connect() as conn:
            return list(conn.execute(uploads.select()).all())
    finally:
        store.engine.dispose()


@pytest.fixture(scope="module")
def intake(
    tmp_path_factory: pytest.TempPathFactory, make_broker_url: Callable[[], str]
) -> Iterator[Intake]:
    home = tmp_path_factory.mktemp("faults")
    stack = start_intake(
        home,
        make_broker_url(),
        f"sqlite:///{home}/retrace.sqlite3",
        "[intake]\nmax_uploads_per_client = 1\n",
    )
    yield stack
    stack.down()


def test_a_body_shorter_than_its_content_length_is_400_and_nothing_is_recorded(
    intake: Intake,
) -> None:
    body = crash(64 << 10)  # a whole archive, and the client says 100 bytes more come
    with connect(intake.port) as sock:
        sock.sendall(head(len(body) + 100) + body)
        sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400"), (answer[:300], intake.logs())
    assert b"ended before its Content-Length" in answer
    settle(intake, intake.store_url)


def test_a_429_is_answered_at_once_and_the_connection_closed(intake: Intake) -> None:
    body = crash(1 << 20)
    with connect(intake.port, "127.0.0.3") as first:
        first.sendall(head(len(body)) + body[: len(body) // 2])
        wait_for(lambda: task_dirs(intake.spool), 20, intake.logs)
        # The same client again, sending its body slowly: it would take minutes.
        with connect(intake.port, "127.0.0.3") as second:
            second.sendall(head(len(body)))
            stop = threading.Event()

            def trickle() -> None:
                for offset in range(0, len(body), 1024):
                    if stop.wait(0.2):
                        return
                    try:
                        second.sendall(body[offset : offset + 1024])
                    except OSError:
                        return

            sender = threading.Thread(target=trickle)
            sender.start()
            try:
                second.settimeout(20)  # not the upload deadline (15 minutes)
                answer = read_all(second)  # the answer, then the server's close
            finally:
                stop.set()
                sender.join()
        assert answer.startswith(b"HTTP/1.1 429"), (answer[:300], intake.logs())
        assert b"Connection: close" in answer
        assert b"uploads in progress" in answer
    settle(intake, intake.store_url)  # the first upload, cut off, left nothing either


def test_idle_and_trickling_sockets_do_not_hold_up_heartbeats(intake: Intake) -> None:
    idle = [connect(intake.port, f"127.0.0.{10 + i}") for i in range(60)]
    trickling = [connect(intake.port, f"127.0.0.{100 + i}") for i in range(20)]
    try:
        body = crash(64 << 10)
        for sock in trickling:
            sock.sendall(head(len(body)) + body[:100])
        time.sleep(0.5)
        for _ in range(5):
            start = time.monotonic()
            status, _, _ = intake.request("GET", "/__lbheartbeat__")
            assert status == 200
            # gthread alone: every thread waits 5 s on an idle socket, heartbeats wait.
            assert time.monotonic() - start < 2.5, intake.logs()
    finally:
        for sock in idle + trickling:
            sock.close()
    settle(intake, intake.store_url)


def test_a_full_spool_answers_507_never_500_and_keeps_nothing_of_refused_uploads(
    tmp_path: Path, make_broker_url: Callable[[], str]
) -> None:
    spool = tmp_path / "var/spool"
    spool.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(spool)], check=True)
    try:
        store_url = f"sqlite:///{tmp_path}/retrace.sqlite3"
        intake = start_intake(
            tmp_path,
            make_broker_url(),
            store_url,
            "[intake]\nmin_free_space_mib = 0\nmax_uploads_per_client = 8\n",
        )
        try:
            body = crash(3 << 20)  # noise: 3 MiB on the spool each, two fit

            def upload(_: int) -> tuple[int, str, bytes, str]:
                status, headers, text = intake.request(
                    "POST", "/create", body, {"Content-Type": XZ}
                )
                return (
                    status,
                    headers.get("X-Task-Id", ""),
                    text,
                    headers.get("X-Task-Password", ""),
                )

            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(upload, range(6)))
            statuses = sorted(answer[0] for answer in answers)
            assert set(statuses) <= {201, 507}, (answers, intake.logs())
            assert 507 in statuses
            for status, _, text, _ in answers:
                if status == 507:
                    assert b"disk space" in text, text
            created = sorted(answer[1] for answer in answers if answer[0] == 201)
            wait_for(lambda: upload_rows(store_url) == [], 20, intake.logs)
            # Only the tasks that were created have folders; no partial one is left.
            assert sorted(p.name for p in task_dirs(spool)) == created
            # With room again, the same client uploads.
            for status, task_id, _, password in answers:
                if status == 201:
                    auth = {"X-Task-Password": password}
                    assert intake.request("DELETE", f"/{task_id}", headers=auth)[0] == 204
            assert intake.request("POST", "/create", body, {"Content-Type": XZ})[0] == 201
        finally:
            intake.down()
    finally:
        subprocess.run(["umount", str(spool)], check=True)


def test_a_killed_workers_upload_goes_at_once_and_a_live_one_stays(
    tmp_path: Path, make_broker_url: Callable[[], str]
) -> None:
    store_url = f"sqlite:///{tmp_path}/retrace.sqlite3"
    intake = start_intake(
        tmp_path,
        make_broker_url(),
        store_url,
        "[intake]\nmax_uploads_per_client = 1\n",
        "--workers",
        "2",
    )
    body = crash(1 << 20)
    socks: dict[str, socket.socket] = {}
    try:
        # Slow uploads from several addresses, until both workers receive some.
        for n in range(2, 40):
            source = f"127.0.0.{n}"
            socks[source] = connect(intake.port, source)
            socks[source].sendall(head(len(body)) + body[:1000])
            wait_for(lambda: len(upload_rows(store_url)) == len(socks), 20, intake.logs)
            pids = {row.pid for row in upload_rows(store_url)}
            if len(pids) == 2:
                break
        rows = upload_rows(store_url)
        victim = rows[0].pid
        doomed = [row for row in rows if row.pid == victim]
        spared = [row for row in rows if row.pid != victim]
        assert spared, "every upload went to one worker"
        assert all((intake.spool / row.task_id).exists() for row in rows)

        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: {row.id for row in upload_rows(store_url)} == {row.id for row in spared},
            60,
            intake.logs,
        )
        for row in doomed:
            assert not (intake.spool / row.task_id).exists()
        # The killed worker's client uploads again at once, its slot given back.
        client = doomed[0].client
        conn = http.client.HTTPConnection(
            "127.0.0.1", intake.port, timeout=60, source_address=(client, 0)
        )
        conn.request("POST", "/create", body=body, headers={"Content-Type": XZ})
        assert conn.getresponse().status == 201, intake.logs()
        conn.close()
        # The other worker's slow upload was never touched: it completes.
        live = spared[0]
        assert (intake.spool / live.task_id).exists()
        sock = socks[live.client]
        sock.sendall(body[1000:])
        assert sock.recv(12) == b"HTTP/1.1 201", intake.logs()
    finally:
        for sock in socks.values():
            sock.close()
        intake.down()
