"""Gathering a crash (ABRT problem directory, plain core, systemd-coredump) and packing it."""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from client.errors import ClientError

# What the server accepts besides the core; ABRT's client sends these too.
TEXT_FILES = ("executable", "package", "packages", "os_release", "release", "cmdline", "reason")
XZ_PRESET = 2  # ABRT's client packs with 'xz -2'
COREDUMPCTL_TIMEOUT = 300


@dataclass
class Crash:
    """The files of one crash, ready to pack."""

    core: Path
    texts: dict[str, str] = field(default_factory=dict)
    # A core made by this client (from coredumpctl) is deleted once packed.
    temporary_core: bool = False

    @property
    def package(self) -> str:
        """The crashed package's NVR."""
        return self.texts["package"]

    @property
    def arch(self) -> str:
        """The architecture the crash happened on."""
        return self.texts.get("architecture") or platform.machine()


def from_problem_dir(directory: Path) -> Crash:
    """A crash from an ABRT problem directory."""
    core = directory / "coredump"
    if not core.is_file():
        raise ClientError(f"{directory} has no 'coredump': is it an ABRT problem directory?")
    texts = {}
    for name in (*TEXT_FILES, "architecture"):
        path = directory / name
        if path.is_file():
            texts[name] = path.read_text(encoding="utf-8", errors="replace").strip()
    for name in ("executable", "package"):
        if name not in texts:
            raise ClientError(f"{directory} has no '{name}' file; the server needs it")
    return Crash(core, texts)


def from_core(core: Path, executable: str, package: str) -> Crash:
    """A crash from a plain core file and what the user says about it."""
    if not core.is_file():
        raise ClientError(f"{core} is not a file")
    return Crash(core, {"executable": executable, "package": package})


def _coredumpctl(argv: list[str]) -> str:
    tool = shutil.which("coredumpctl")
    if tool is None:
        raise ClientError("coredumpctl is not installed: is systemd-coredump in use here?")
    try:
        done = subprocess.run(
            [tool, *argv], capture_output=True, text=True, timeout=COREDUMPCTL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ClientError(f"coredumpctl {' '.join(argv)} did not finish") from exc
    if done.returncode != 0:
        raise ClientError(f"coredumpctl {' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _field(match: str, name: str, required: bool = True) -> str | None:
    values = [v for v in _coredumpctl(["--no-pager", "-F", name, match]).splitlines() if v]
    if len(set(values)) > 1:
        raise ClientError(f"{match!r} matches several crashes; name one by its PID")
    if not values:
        if required:
            raise ClientError(f"the journal records no {name} for {match!r}")
        return None
    return values[0]


def from_coredumpctl(match: str, workdir: Path) -> Crash:
    """A crash that systemd-coredump recorded, read through ``coredumpctl``."""
    executable = _field(match, "COREDUMP_EXE")
    name = _field(match, "COREDUMP_PACKAGE_NAME", required=False)
    version = _field(match, "COREDUMP_PACKAGE_VERSION", required=False)
    if not name or not version:
        raise ClientError(
            f"the journal does not say which package {executable} came from; "
            "use --core with --executable and --package instead"
        )
    core = dump_coredumpctl(match, workdir)
    texts = {"executable": executable or "", "package": f"{name}-{version}"}
    cmdline = _field(match, "COREDUMP_CMDLINE", required=False)
    if cmdline:
        texts["cmdline"] = cmdline
    return Crash(core, texts, temporary_core=True)


def dump_coredumpctl(match: str, workdir: Path) -> Path:
    """The core of the crash ``match`` names, written out by ``coredumpctl dump``."""
    core = workdir / "coredump"
    _coredumpctl(["--no-pager", "-1", "-o", str(core), "dump", match])
    return core


class _Counting:
    """A file being read, reporting how far the reading got."""

    def __init__(self, source: BinaryIO, size: int, progress: Callable[[int, int], None]) -> None:
        self._source = source
        self._size = size
        self._done = 0
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._source.read(n)
        self._done += len(data)
        self._progress(self._done, self._size)
        return data


def pack(
    crash: Crash,
    keep: bool,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[BinaryIO, int, Path | None]:
    """Pack the crash as ``tar | xz -2`` into a temporary file.

    Returns the open file (at its start), its size, and its path when ``keep``
    asked for a file that outlives the client (ABRT's ``--no-unlink``); otherwise
    the file is unlinked at once and vanishes when closed.
    """
    if keep:
        fd, name = tempfile.mkstemp(prefix="retrace-", suffix=".tar.xz")
        out: BinaryIO = os.fdopen(fd, "w+b")
        kept: Path | None = Path(name)
    else:
        # Unlinked at once: nothing is left behind, whatever happens to this process.
        out, kept = tempfile.TemporaryFile(prefix="retrace-"), None  # noqa: SIM115 -- returned open
    size = crash.core.stat().st_size
    with tarfile.open(fileobj=out, mode="w:xz", preset=XZ_PRESET) as tar:  # type: ignore[call-overload]
        info = tar.gettarinfo(str(crash.core), arcname="coredump")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o600
        with crash.core.open("rb") as core:
            reader = _Counting(core, size, progress) if progress else core
            tar.addfile(info, cast("BinaryIO", reader))
        for name, text in crash.texts.items():
            data = text.encode()
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            entry.mode = 0o644
            tar.addfile(entry, io.BytesIO(data))
    if crash.temporary_core:
        crash.core.unlink(missing_ok=True)
    total = out.tell()
    out.seek(0)
    return out, total, kept
