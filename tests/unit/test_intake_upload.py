"""``POST /create`` refuses every malformed upload with a reason, and leaves nothing.

Each case sends a real archive (built by tarfile, xz, gzip or zstd as a client
would) or a real malformed request, with the real core of tests/fixtures where a
valid core is needed.  The same checks run through gunicorn in
tests/integration/test_intake_http.py.
"""

# The shared fixtures are imported from test_intake.py, and pytest passes them by name.
# ruff: noqa: F811

from __future__ import annotations

import gzip
import io
import lzma
import os
import string
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import falcon.testing
import pytest
import zstandard

from schemas.messages import AnalyzeTaskV1, TaskType
from services.common.data.intake import TaskStatus, tasks
from tests.fixtures.build import Fixtures
from tests.unit.test_intake import (  # noqa: F401 -- shared fixtures
    XZ,
    Intake,
    MakeIntake,
    elf_header,
    intake,
    make_intake,
    task_dirs,
)

TAR = "application/x-tar"
GZ = "application/x-gzip"
ZSTD = "application/zstd"

Member = tarfile.TarInfo | tuple[str, bytes]


def real_crash(fixtures: Fixtures) -> dict[str, bytes]:
    """The files of the fixtures' problem directory, as ABRT's client sends them."""
    wanted = ("coredump", "executable", "package", "os_release")
    return {name: (fixtures.crash.problem_dir / name).read_bytes() for name in wanted}


def tar_bytes(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def files(crash: dict[str, bytes], *extra: Member, leave_out: str = "") -> list[Member]:
    members: list[Member] = [(k, v) for k, v in crash.items() if k != leave_out]
    return [*members, *extra]


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def xz(data: bytes, preset: int = 2) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=preset)


@pytest.fixture
def crash(crash_fixtures: Fixtures) -> dict[str, bytes]:
    return real_crash(crash_fixtures)


def assert_nothing_left(intake: Intake) -> None:
    assert task_dirs(intake.spool.root) == []
    with intake.store.engine.connect() as conn:
        assert conn.execute(tasks.select()).all() == []
    assert intake.publisher.sent == []


def refused(answer: falcon.testing.Result, status: int, says: str, intake: Intake) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert says in answer.text
    assert_nothing_left(intake)


def test_the_real_crash_is_accepted_in_every_format(
    intake: Intake, crash: dict[str, bytes]
) -> None:
    plain = tar_bytes(files(crash))
    bodies = {
        XZ: xz(plain),
        GZ: gzip.compress(plain),
        TAR: plain,
        ZSTD: zstandard.ZstdCompressor(level=3).compress(plain),
    }
    for content_type, body in bodies.items():
        answer = intake.create(body, content_type)
        assert answer.status_code == 201, (content_type, answer.text)
        task_id = answer.headers["X-Task-Id"]
        core = intake.spool.crash_dir(task_id) / "coredump"
        assert core.read_bytes() == crash["coredump"]
    assert len(intake.publisher.sent) == 4


@pytest.mark.parametrize(
    ("member", "says"),
    [
        (("../coredump", b"x"), "'../coredump' points outside the archive"),
        (("/etc/coredump", b"x"), "'/etc/coredump' has an absolute name"),
        (special("maps", tarfile.SYMTYPE, "/etc/shadow"), "'maps' is a symlink"),
        (special("release", tarfile.LNKTYPE, "package"), "'release' is a hard link"),
        (special("cmdline", tarfile.CHRTYPE), "'cmdline' is a character device"),
        (special("reason", tarfile.BLKTYPE), "'reason' is a block device"),
        (special("os_release2", tarfile.FIFOTYPE), "'os_release2' is a FIFO"),
        (special("sub", tarfile.DIRTYPE), "'sub' is a directory"),
        (("package", b"crasher-1.0-1.fc40"), "file 'package' appears twice"),
        (("core\ndump", b"x"), "control characters"),
        (("environ", b"SECRET=1"), "file 'environ' is not accepted"),
        (("sub/coredump", b"x"), "file 'sub/coredump' is not accepted"),
        (("reason", b"r" * 600), "file 'reason' is 600 bytes; at most 512"),
        (("rootdir", b"/" * 257), "file 'rootdir' is 257 bytes; at most 256"),
        (
            ("os_release_in_rootdir", b"F" * 129),
            "'os_release_in_rootdir' is 129 bytes; at most 128",
        ),
    ],
)
def test_an_unsafe_or_unwanted_member_is_refused_with_403(
    intake: Intake, crash: dict[str, bytes], member: Member, says: str
) -> None:
    answer = intake.create(xz(tar_bytes(files(crash, member))))
    refused(answer, 403, says, intake)


def test_the_files_abrt_retrace_client_adds_for_a_container_crash_are_accepted(
    intake: Intake, crash: dict[str, bytes]
) -> None:
    # What it packs when the problem directory has them, each at its cap.
    rootdir = b"/var/lib/machines/f40".ljust(256, b"/")
    inside = b"Fedora release 40 (Forty)".ljust(128, b" ")
    extra = [("rootdir", rootdir), ("os_release_in_rootdir", inside)]
    answer = intake.create(xz(tar_bytes(files(crash, *extra))))
    assert answer.status_code == 201, answer.text
    crash_dir = intake.spool.crash_dir(answer.headers["X-Task-Id"])
    assert (crash_dir / "rootdir").read_bytes() == rootdir
    assert (crash_dir / "os_release_in_rootdir").read_bytes() == inside
    assert len(intake.publisher.sent) == 1


@pytest.mark.parametrize("name", ["coredump", "executable", "package"])
def test_a_missing_required_file_is_refused_with_403(
    intake: Intake, crash: dict[str, bytes], name: str
) -> None:
    answer = intake.create(xz(tar_bytes(files(crash, leave_out=name))))
    refused(answer, 403, f"required file '{name}' is missing", intake)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("executable", b"crasher", "'executable' must hold one absolute path"),
        ("executable", b'/usr/bin/a"b', "'executable' must hold one absolute path"),
        ("executable", b"/usr/bin/a\n/usr/bin/b", "'executable' must hold one absolute path"),
        ("package", b"not a package", "'package' does not hold a package NVR"),
        ("coredump", Path("/bin/true").read_bytes(), "'coredump' is not a core dump"),
        ("coredump", b"MZ" + bytes(100), "'coredump' is not a core dump"),
    ],
)
def test_bad_metadata_is_refused_with_400(
    intake: Intake, crash: dict[str, bytes], name: str, content: bytes, says: str
) -> None:
    crash[name] = content
    refused(intake.create(xz(tar_bytes(files(crash)))), 400, says, intake)


def test_a_core_of_an_arch_without_analyzer_is_refused_before_a_task_exists(
    intake: Intake, crash: dict[str, bytes]
) -> None:
    crash["coredump"] = elf_header(machine=183) + bytes(100)
    refused(intake.create(xz(tar_bytes(files(crash)))), 400, "aarch64", intake)


@pytest.mark.parametrize(
    ("content_type", "compress"),
    [(XZ, xz), (GZ, gzip.compress), (ZSTD, zstandard.ZstdCompressor().compress), (TAR, bytes)],
)
def test_a_truncated_archive_is_refused_with_400(
    intake: Intake,
    crash: dict[str, bytes],
    content_type: str,
    compress: Callable[[bytes], bytes],
) -> None:
    body = compress(tar_bytes(files(crash)))
    answer = intake.create(body[: len(body) * 2 // 3], content_type)
    refused(answer, 400, "truncated", intake)


def test_a_corrupt_xz_is_refused_with_400(intake: Intake, crash: dict[str, bytes]) -> None:
    body = bytearray(xz(tar_bytes(files(crash))))
    body[len(body) // 2] ^= 0xFF
    refused(intake.create(bytes(body)), 400, "corrupt", intake)


@pytest.mark.parametrize("content_type", [XZ, GZ, TAR, ZSTD])
def test_an_empty_body_is_refused_with_400(intake: Intake, content_type: str) -> None:
    answer = intake.client.simulate_post(
        "/create", body=b"", headers={"Content-Type": content_type, "Content-Length": "0"}
    )
    refused(answer, 400, "", intake)


def test_a_body_without_content_length_is_refused_with_411(intake: Intake) -> None:
    refused(intake.create(b"", TAR), 411, "Content-Length", intake)


def test_a_wrong_content_type_is_refused_with_415(intake: Intake, crash: dict[str, bytes]) -> None:
    answer = intake.create(tar_bytes(files(crash)), "application/zip")
    refused(answer, 415, "application/zstd", intake)


def test_an_upload_over_the_packed_limit_is_refused_with_413(make_intake: MakeIntake) -> None:
    intake = make_intake(max_packed_size_mib=1)
    refused(intake.create(os.urandom((1 << 20) + 1), TAR), 413, "1 MiB limit", intake)


def test_a_10_mb_xz_bomb_stops_at_the_unpacked_limit(make_intake: MakeIntake) -> None:
    # 10 MB of noise keeps the xz at 10 MB; the zeros behind it take it past the limit.
    intake = make_intake(max_unpacked_size_mib=64, max_packed_size_mib=50)
    core = elf_header() + os.urandom(10 << 20) + bytes(200 << 20)
    body = xz(tar_bytes([("coredump", core)]), preset=0)
    assert 10 << 20 < len(body) < 11 << 20
    refused(intake.create(body), 413, "more than 64 MiB", intake)


def test_an_xz_asking_for_a_huge_dictionary_is_refused_with_413(
    intake: Intake, crash: dict[str, bytes], tmp_path: Path
) -> None:
    plain = tmp_path / "crash.tar"
    plain.write_bytes(tar_bytes(files(crash)))
    # The real xz tool writes a header asking the decoder for a 1.5 GiB dictionary.
    xz_tool = ["xz", "--format=xz", "--lzma2=preset=0,dict=1536MiB", "--memlimit-compress=0"]
    subprocess.run([*xz_tool, "-k", str(plain)], check=True)
    body = (tmp_path / "crash.tar.xz").read_bytes()
    refused(intake.create(body), 413, "needs more than 96 MiB of memory", intake)


def test_a_zstd_asking_for_a_huge_window_is_refused_with_413(
    intake: Intake, crash: dict[str, bytes]
) -> None:
    # Without a content size in the frame, the decoder must allocate the whole window.
    params = zstandard.ZstdCompressionParameters(
        window_log=30, enable_ldm=True, write_content_size=False
    )
    compressor = zstandard.ZstdCompressor(compression_params=params)
    chunker = compressor.compressobj()
    body = chunker.compress(tar_bytes(files(crash))) + chunker.flush()
    refused(intake.create(body, ZSTD), 413, "window", intake)


def test_a_sparse_member_that_claims_to_be_small_is_counted_at_its_real_size(
    make_intake: MakeIntake, tmp_path: Path
) -> None:
    intake = make_intake(max_unpacked_size_mib=64)
    core = tmp_path / "coredump"
    with core.open("wb") as f:
        f.write(elf_header())
        f.truncate(1 << 30)  # 1 GiB that tar stores in a few blocks
    archive = tmp_path / "crash.tar"
    subprocess.run(
        ["tar", "--sparse", "-cf", str(archive), "-C", str(tmp_path), "coredump"], check=True
    )
    assert archive.stat().st_size < 64 << 10
    refused(intake.create(archive.read_bytes(), TAR), 413, "more than 64 MiB", intake)


def test_too_little_free_space_is_refused_with_507_before_reading(
    make_intake: MakeIntake, crash: dict[str, bytes]
) -> None:
    intake = make_intake(min_free_space_mib=1 << 40)
    refused(intake.create(xz(tar_bytes(files(crash)))), 507, "disk space", intake)


def test_free_space_running_out_during_the_upload_is_refused_with_507(
    make_intake: MakeIntake,
) -> None:
    # The disk fills while we write: the spool's free space is watched as bytes land.
    written: list[int] = []

    def free_space(where: Path) -> int:
        written.append(1)
        return (2 << 30) if len(written) == 1 else (1 << 20)

    intake = make_intake(free_space=free_space, min_free_space_mib=1024)
    core = elf_header() + bytes(40 << 20)
    answer = intake.create(xz(tar_bytes([("coredump", core)]), preset=0))
    refused(answer, 507, "disk space", intake)
    assert len(written) >= 2


def test_admission_refuses_with_503_and_retry_after_at_the_limit(
    make_intake: MakeIntake, crash: dict[str, bytes]
) -> None:
    intake = make_intake(max_running_tasks=2)
    body = xz(tar_bytes(files(crash)))
    assert intake.create(body).status_code == 201
    assert intake.create(body).status_code == 201
    answer = intake.create(body)
    assert answer.status_code == 503
    assert int(answer.headers["Retry-After"]) > 0
    settings = dict(
        line.split(" ", 1) for line in intake.client.simulate_get("/settings").text.splitlines()
    )
    assert settings["running_tasks"] == "2"
    assert settings["max_running_tasks"] == "2"


def test_a_client_over_its_concurrent_uploads_is_refused_with_429(
    make_intake: MakeIntake, crash: dict[str, bytes]
) -> None:
    intake = make_intake(max_uploads_per_client=1)
    # Another worker is receiving an upload from the same address right now.
    from datetime import UTC, datetime, timedelta

    intake.store.intake.begin_upload(
        "elsewhere", "127.0.0.1", datetime.now(UTC) - timedelta(hours=1)
    )
    answer = intake.create(xz(tar_bytes(files(crash))))
    refused(answer, 429, "uploads in progress", intake)
    assert int(answer.headers["Retry-After"]) > 0
    intake.store.intake.end_upload("elsewhere")
    assert intake.create(xz(tar_bytes(files(crash)))).status_code == 201


def test_an_upload_past_its_time_limit_is_refused_with_408(
    make_intake: MakeIntake, crash: dict[str, bytes]
) -> None:
    intake = make_intake(upload_timeout_seconds=1)

    class Slow(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            import time

            time.sleep(0.6)
            return super().read(min(size or 1, 1000))

    body = xz(tar_bytes(files(crash)))
    answer = intake.client.simulate_post(
        "/create",
        headers={"Content-Type": XZ, "Content-Length": str(len(body))},
        extras={"wsgi.input": Slow(body)},
    )
    refused(answer, 408, "took longer", intake)


@pytest.mark.parametrize(("header", "status"), [("2", 409), ("3", 409), ("4", 409), ("x", 400)])
def test_task_types_not_offered_or_unknown_are_refused(
    intake: Intake, crash: dict[str, bytes], header: str, status: int
) -> None:
    answer = intake.client.simulate_post(
        "/create",
        body=xz(tar_bytes(files(crash))),
        headers={"Content-Type": XZ, "X-Task-Type": header},
    )
    refused(answer, status, "X-Task-Type", intake)


def test_a_debug_task_is_recorded_and_queued_as_debug(
    intake: Intake, crash: dict[str, bytes]
) -> None:
    answer = intake.client.simulate_post(
        "/create",
        body=xz(tar_bytes(files(crash))),
        headers={"Content-Type": XZ, "X-Task-Type": "1"},
    )
    assert answer.status_code == 201
    task = intake.store.intake.get_task(answer.headers["X-Task-Id"])
    assert task is not None
    assert task.task_type == TaskType.DEBUG
    assert task.status == TaskStatus.QUEUED
    [(_, message, _)] = intake.publisher.sent
    assert isinstance(message, AnalyzeTaskV1)
    assert message.task_type == TaskType.DEBUG


def test_task_ids_and_passwords_are_unguessable_and_stored_as_digests(
    intake: Intake, crash: dict[str, bytes]
) -> None:
    body = xz(tar_bytes(files(crash)))
    answers = [intake.create(body) for _ in range(3)]
    ids = {a.headers["X-Task-Id"] for a in answers}
    passwords = {a.headers["X-Task-Password"] for a in answers}
    assert len(ids) == len(passwords) == 3
    for answer in answers:
        task_id, password = answer.headers["X-Task-Id"], answer.headers["X-Task-Password"]
        assert len(task_id) >= 24
        assert set(task_id) <= set(string.ascii_letters + string.digits + "-_")
        assert len(password) == 32
        task = intake.store.intake.get_task(task_id)
        assert task is not None
        assert password not in task.password_digest
