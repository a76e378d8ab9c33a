"""retrace-client's packing and task list (the HTTP side runs in tests/integration)."""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

import pytest

from client.errors import ClientError
from client.problem import Crash, from_problem_dir, pack
from client.state import Remembered, State


def test_a_problem_dir_is_packed_as_abrt_does_without_extra_files(tmp_path: Path) -> None:
    (tmp_path / "coredump").write_bytes(b"\x7fELF core")
    (tmp_path / "executable").write_text("/usr/bin/crasher\n")
    (tmp_path / "package").write_text("crasher-1.0-1.fc40")
    (tmp_path / "environ").write_text("SECRET=1")  # ABRT keeps it; the server must not get it
    crash = from_problem_dir(tmp_path)
    seen: list[tuple[int, int]] = []
    archive, size, kept = pack(crash, keep=False, progress=lambda d, t: seen.append((d, t)))
    assert kept is None
    with archive, tarfile.open(fileobj=archive, mode="r:xz") as tar:
        assert sorted(tar.getnames()) == ["coredump", "executable", "package"]
        member = tar.extractfile("executable")
        assert member is not None
        assert member.read() == b"/usr/bin/crasher"
    assert size > 0
    assert seen[-1] == (9, 9)


def test_no_unlink_keeps_the_archive(tmp_path: Path) -> None:
    core = tmp_path / "core"
    core.write_bytes(b"core")
    archive, size, kept = pack(Crash(core, {"executable": "/x", "package": "x-1-1"}), keep=True)
    archive.close()
    assert kept is not None
    assert kept.stat().st_size == size
    kept.unlink()


def test_a_directory_without_a_core_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ClientError, match="no 'coredump'"):
        from_problem_dir(tmp_path)


def test_the_task_list_is_private_and_remembers_new_passwords(tmp_path: Path) -> None:
    state = State(tmp_path / "state" / "tasks.json")
    state.put("task1", Remembered("https://retrace.example.org", "a" * 32))
    state.put("task1", Remembered("https://retrace.example.org", "b" * 32))
    assert state.get("task1") == Remembered("https://retrace.example.org", "b" * 32)
    assert state.get("task2") is None
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o600
