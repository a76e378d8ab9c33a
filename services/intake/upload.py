"""Receiving a crash archive: decompress and untar straight from the request stream.

The archive is never held whole in memory and never written to disk twice: each
accepted member goes from the decompressor to its file in the task's spool
folder.  Limits are checked while reading.
"""

from __future__ import annotations

import io
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.elf import NotACore, core_arch
from services.intake.errors import Refusal

CHUNK = 1 << 20

# The original server's list, and its size caps in bytes (0: no cap of its own).
ACCEPTED_FILES: dict[str, int] = {
    "coredump": 0,
    "executable": 512,
    "package": 128,
    "packages": 1 << 20,
    "os_release": 128,
    "release": 128,
    "architecture": 32,
    "cmdline": 4096,
    "reason": 512,
}
REQUIRED_FILES = ("coredump", "executable", "package")

# Decoders must not be talked into allocating huge buffers by a hostile header.
XZ_MEMLIMIT = 256 << 20

NVR = re.compile(
    r"^(?P<name>[^\s/]+)-(?:(?P<epoch>\d+):)?(?P<version>[^-\s/]+)-(?P<release>[^-\s/]+)$"
)


class Readable(Protocol):
    """A stream of the request body (falcon's ``BoundedStream``, or any binary file)."""

    def read(self, size: int = ..., /) -> bytes: ...


class _Decompressor(io.RawIOBase):
    """A read-only stream of the decompressed bytes of another stream."""

    def __init__(self, source: Readable, decompress: Callable[[bytes], bytes] | None) -> None:
        self._source = source
        self._decompress = decompress
        self._buffer = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        while not self._buffer and not self._eof:
            data = self._source.read(CHUNK)
            if not data:
                self._eof = True
                break
            self._buffer = self._decompress(data) if self._decompress else data
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _xz() -> Callable[[bytes], bytes]:
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)

    def decompress(data: bytes) -> bytes:
        try:
            return decoder.decompress(data)
        except lzma.LZMAError as exc:
            if "memory" in str(exc).lower():
                raise Refusal(
                    413, "the xz archive needs more memory to decompress than allowed"
                ) from exc
            raise Refusal(400, f"the xz archive is corrupt: {exc}") from exc

    return decompress


def _gzip() -> Callable[[bytes], bytes]:
    decoder = zlib.decompressobj(wbits=31)

    def decompress(data: bytes) -> bytes:
        try:
            return decoder.decompress(data, CHUNK * 4)
        except zlib.error as exc:
            raise Refusal(400, f"the gzip archive is corrupt: {exc}") from exc

    return decompress


DECODERS: dict[str, Callable[[], Callable[[bytes], bytes]] | None] = {
    "application/x-xz-compressed-tar": _xz,
    "application/x-gzip": _gzip,
    "application/x-tar": None,
}


@dataclass(frozen=True)
class Crash:
    """What an accepted upload told us."""

    arch: str
    executable: str
    package: str
    files: tuple[str, ...]


def receive(stream: Readable, content_type: str, dest: Path, max_unpacked: int) -> Crash:
    """Unpack the archive on ``stream`` into ``dest`` and check the problem directory.

    Raises :class:`Refusal` naming what was wrong; ``dest`` may then hold a part
    of the upload, which the caller removes.
    """
    factory = DECODERS[content_type]
    raw = _Decompressor(stream, factory() if factory else None)
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(fileobj=io.BufferedReader(raw, CHUNK), mode="r|") as tar:
            for member in tar:
                name = _check_member(member, seen)
                if name is None:
                    continue
                cap = ACCEPTED_FILES[name]
                if cap and member.size > cap:
                    raise Refusal(403, f"file '{name}' is {member.size} bytes; at most {cap}")
                total += member.size
                if total > max_unpacked:
                    raise Refusal(413, f"the archive unpacks to more than {max_unpacked} bytes")
                source = tar.extractfile(member)
                assert source is not None
                with (dest / name).open("xb") as out:
                    while chunk := source.read(CHUNK):
                        out.write(chunk)
    except (tarfile.TarError, EOFError) as exc:
        raise Refusal(400, f"the archive is corrupt or truncated: {exc}") from exc
    return _check_problem_dir(dest, tuple(sorted(seen)))


def _check_member(member: tarfile.TarInfo, seen: set[str]) -> str | None:
    """The member's file name if it is acceptable, ``None`` for the archive's own "./"."""
    name = member.name.removeprefix("./")
    if member.isdir() and name in ("", "."):
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise Refusal(403, f"archive member {name!r} has control characters in its name")
    if not member.isfile():
        kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else "not a file"
        raise Refusal(403, f"archive member '{name}' is {kind}; only regular files are accepted")
    if name not in ACCEPTED_FILES:
        raise Refusal(403, f"file '{name}' is not accepted (accepted: {', '.join(ACCEPTED_FILES)})")
    if name in seen:
        raise Refusal(403, f"file '{name}' appears twice in the archive")
    seen.add(name)
    return name


def _read_line(path: Path, name: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(400, f"file '{name}' is not UTF-8 text") from exc
    return text.strip()


def _check_problem_dir(dest: Path, files: tuple[str, ...]) -> Crash:
    for name in REQUIRED_FILES:
        if name not in files:
            raise Refusal(403, f"required file '{name}' is missing from the archive")
    executable = _read_line(dest / "executable", "executable")
    if not executable.startswith("/") or any(c in executable for c in "\"'\n\r\0"):
        raise Refusal(400, "file 'executable' must hold one absolute path without quotes")
    package = _read_line(dest / "package", "package")
    if not NVR.match(package):
        raise Refusal(400, f"file 'package' does not hold a package NVR: {package[:80]!r}")
    try:
        arch = core_arch(dest / "coredump")
    except NotACore as exc:
        raise Refusal(400, f"file 'coredump' is not a core dump: {exc}") from exc
    return Crash(arch=arch, executable=executable, package=package, files=files)
