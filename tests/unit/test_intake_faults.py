"""Faults during an upload: a full disk or quota, a body cut short, a dead worker's upload.

The intake is built with a real store (SQLite and PostgreSQL) and spool; faults the
kernel of this machine cannot produce (EDQUOT: no quotas here) come through the
intake's own file opener, passed to ``create_app``.  The same faults through gunicorn
and a real full tmpfs are in tests/integration/test_intake_faults.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import falcon.testing
import pytest
import sqlalchemy as sa
from typing_extensions import Buffer

from services.common.data.intake import tasks, uploads
from services.common.settings import IntakeConfig, load_settings
from services.common.spool import Spool
from services.intake.app import create_app
from services.intake.leases import Leases
from services.intake.upload import Opener, open_new
from tests.data import Data
from tests.unit.test_intake import XZ, RecordingPublisher, elf_header, task_dirs
from tests.unit.test_intake_upload import tar_bytes, xz


class QuotaFile(io.FileIO):
    """A new file on a filesystem whose quota runs out after ``room`` bytes."""

    def __init__(self, path: Path, room: int) -> None:
        super().__init__(path, "xb")
        self._room = room

    def write(self, data: Buffer) -> int:
        size = memoryview(data).nbytes
        if size > self._room:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        self._room -= size
        return super().write(data)


@pytest.fixture
def build(tmp_path: Path, store_url: str) -> Iterator[Callable[..., App]]:
    stores: list[Data] = []

    def make(opener: Opener | None = None, **intake: object) -> App:
        env = {"RETRACE_HOME": str(tmp_path), "RETRACE_STORE__URL": store_url}
        env.update({f"RETRACE_INTAKE__{k.upper()}": json.dumps(v) for k, v in intake.items()})
        settings = load_settings(IntakeConfig, env)
        store = Data.from_url(settings.store_url)
        store.migrate()
        stores.append(store)
        spool = Spool(settings.spool)
        publisher = RecordingPublisher()
        app = create_app(
            settings,
            store.intake,
            store.mirror,
            spool,
            publisher,
            free_space=lambda _: 1 << 40,
            opener=opener or open_new,
        )
        return App(falcon.testing.TestClient(app), store, spool, publisher)

    yield make
    for store in stores:
        store.engine.dispose()


class App:
    def __init__(
        self,
        client: falcon.testing.TestClient,
        store: Data,
        spool: Spool,
        publisher: RecordingPublisher,
    ) -> None:
        self.client, self.store, self.spool, self.publisher = client, store, spool, publisher

    def post(self, body: bytes, length: int | None = None) -> falcon.testing.Result:
        headers = {
            "Content-Type": XZ,
            "Content-Length": str(len(body) if length is None else length),
        }
        return self.client.simulate_post("/create", body=body, headers=headers)

    def rows(self, table: sa.Table) -> list[sa.Row[object]]:
        with self.store.engine.connect() as conn:
            return list(conn.execute(table.select()).all())

    def assert_nothing_left(self) -> None:
        assert task_dirs(self.spool.root) == []
        assert self.rows(tasks) == []
        assert self.rows(uploads) == []
        assert self.publisher.sent == []


def crash(core_size: int = 3 << 20) -> bytes:
    core = elf_header() + os.urandom(core_size)
    return xz(
        tar_bytes(
            [
                ("coredump", core),
                ("executable", b"/usr/bin/crasher"),
                ("package", b"crasher-1.0-1.fc40"),
            ]
        )
    )


def test_a_quota_running_out_mid_upload_is_507_saying_so_and_leaves_nothing(
    build: Callable[..., App],
) -> None:
    room = {"left": 1 << 20}

    def opener(path: Path) -> IO[bytes]:
        return io.BufferedWriter(QuotaFile(path, room["left"]))

    app = build(opener, max_uploads_per_client=1)
    answer = app.post(crash())
    assert answer.status_code == 507, answer.text
    assert "ran out of disk space while writing 'coredump'" in answer.text
    assert "Disk quota exceeded" in answer.text
    app.assert_nothing_left()
    # The client's one upload slot was given back: with room again, it uploads.
    room["left"] = 1 << 30
    assert app.post(crash()).status_code == 201


def test_a_body_shorter_than_its_content_length_is_400_even_with_a_whole_archive(
    build: Callable[..., App],
) -> None:
    app = build()
    body = crash(64 << 10)
    answer = app.post(body, length=len(body) + 100)
    assert answer.status_code == 400, answer.text
    assert "ended before its Content-Length" in answer.text
    app.assert_nothing_left()


def test_data_after_the_archive_is_400_but_zero_padding_is_accepted(
    build: Callable[..., App],
) -> None:
    app = build()
    body = crash(64 << 10)
    answer = app.post(body + b"this is not part of the archive")
    assert answer.status_code == 400, answer.text
    assert "data after its end" in answer.text
    app.assert_nothing_left()
    assert app.post(body + bytes(4)).status_code == 201  # xz's stream padding


def test_an_expired_lease_lets_a_dead_workers_upload_go_and_a_live_ones_stay(
    build: Callable[..., App],
) -> None:
    app = build()
    dead = Leases(app.store.intake, app.spool, holder=("host-a", 101))
    live = Leases(app.store.intake, app.spool, holder=("host-b", 202))
    since = datetime.now(UTC) - timedelta(hours=1)
    for leases, upload, folder in ((dead, "up-dead", "taskdead"), (live, "up-live", "tasklive")):
        assert leases.begin(upload, "192.0.2.1", folder, since) >= 1
        (app.spool.create(folder) / "coredump").write_bytes(b"part of an upload")
    # A third upload whose worker died after recording its task: the task keeps its folder.
    assert dead.begin("up-recorded", "192.0.2.2", "taskrecorded", since) == 1
    app.spool.create("taskrecorded")
    app.store.intake.create_task("taskrecorded", "0" * 64, "x86_64", "retrace", "queued")
    # host-a stopped renewing a minute ago; host-b renews and sweeps.
    with app.store.engine.begin() as conn:
        conn.execute(
            uploads.update()
            .where(uploads.c.host == "host-a")
            .values(renewed_at=datetime.now(UTC) - timedelta(minutes=1))
        )
    live.tick()
    assert [row.id for row in app.rows(uploads)] == ["up-live"]
    assert not app.spool.task_dir("taskdead").exists()
    assert (app.spool.crash_dir("tasklive") / "coredump").exists()
    assert app.spool.task_dir("taskrecorded").exists()
    # The client's dead upload no longer counts against it; its live one does.
    assert live.begin("up-next", "192.0.2.1", "tasknext", since) == 2
