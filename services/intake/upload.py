"""Receiving a crash archive: decompress and untar straight from the request stream.

The archive is never held whole in memory and never written to disk twice: each
accepted member goes from the decompressor to its file in the task's spool
folder.  Every limit is checked while reading: decoders get a memory limit, the
unpacked total and each file's cap are counted as bytes arrive, and the free space
of the spool is looked at again every few MiB written.
"""

from __future__ import annotations

import contextlib
import errno
import io
import lzma
import os
import queue
import socket
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

import zstandard

from schemas.nvr import parse_nvr
from services.common.elf import NotACore, core_arch
from services.intake.errors import Refusal

# Bytes read from the client at a time: small enough that the upload's deadline is
# checked often, large enough to keep the decoder busy.
PIECE = 256 << 10
# Bytes of decompressed data handed to the tar reader at a time.
CHUNK = 1 << 20
# Free space is looked at again after this many bytes written.
SPACE_CHECK_EVERY = 8 << 20
# Zero blocks after a tar's end: tar pads to its record size (10 KiB by default).
TRAILING_LIMIT = 1 << 20

# The original server's list, and its size caps in bytes (0: no cap of its own).
# abrt-retrace-client adds rootdir and os_release_in_rootdir when the problem directory
# has them (a crash in a container or chroot: its root, and the release inside it).
ACCEPTED_FILES: dict[str, int] = {
    "coredump": 0,
    "executable": 512,
    "package": 128,
    "packages": 1 << 20,
    "os_release": 128,
    "os_release_in_rootdir": 128,
    "rootdir": 256,
    "release": 128,
    "architecture": 32,
    "cmdline": 4096,
    "reason": 512,
}
REQUIRED_FILES = ("coredump", "executable", "package")


MIB = 1 << 20


class Readable(Protocol):
    """A stream of the request body (falcon's ``BoundedStream``, or any binary file)."""

    def read(self, size: int = ..., /) -> bytes: ...


@dataclass(frozen=True)
class Limits:
    """What one upload may use."""

    declared: int
    """The body's Content-Length: fewer bytes than this is a truncated upload."""
    max_unpacked: int
    min_free: int
    decoder_memory: int
    deadline: float
    """``time.monotonic()`` after which the upload is refused with 408."""


FreeSpace = Callable[[Path], int]

Opener = Callable[[Path], IO[bytes]]
"""Makes a new file for writing (never one that exists), e.g. :func:`open_new`."""


def open_new(path: Path) -> IO[bytes]:
    """A new file at ``path``, opened for writing; an existing one is an error."""
    return path.open("xb")


# A full disk, or a full quota (on a shared spool, the intake's user may have one).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_refused(doing: str) -> Iterator[None]:
    """Turn running out of disk space or quota while ``doing`` into a 507 saying so."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise Refusal(
            507,
            f"the server ran out of disk space while {doing} ({os.strerror(exc.errno)}); "
            "try again later",
            code="disk_full",
        ) from exc


class ClientSocket(Protocol):
    """The client's socket (gunicorn's ``gunicorn.socket``), for timeouts and shutdown."""

    def settimeout(self, value: float | None, /) -> None: ...

    def shutdown(self, how: int, /) -> None: ...


class Body:
    """The request body, read in pieces, counted, and bounded in time.

    With the client's socket at hand, a read that would block past the upload's
    deadline times out, so a client that stops sending cannot hold a thread for ever.
    """

    def __init__(self, stream: Readable, limits: Limits, sock: ClientSocket | None = None) -> None:
        self._stream = stream
        self._sock = sock
        self.limits = limits
        self.received = 0

    def read(self, size: int = PIECE) -> bytes:
        """At most ``size`` bytes; ``b""`` once the declared length has been read."""
        want = min(size, PIECE, self.limits.declared - self.received)
        if want <= 0:
            return b""
        left = self.limits.deadline - time.monotonic()
        if left <= 0:
            raise _too_slow()
        try:
            if self._sock is not None:
                self._sock.settimeout(left)
            data = self._stream.read(want)
        except TimeoutError as exc:
            raise _too_slow() from exc
        except Exception as exc:
            raise Refusal(400, "the upload ended before its Content-Length", code="cut") from exc
        if not data:
            raise Refusal(400, "the upload ended before its Content-Length", code="cut")
        self.received += len(data)
        return data

    def finish(self) -> None:
        """Read what is left of the declared body once the archive has ended.

        A body shorter than its Content-Length is refused (400), even when the archive
        in it happens to be complete; zero bytes after the archive (padding) are
        dropped, anything else is refused as data after its end.
        """
        while data := self.read(PIECE):
            if data.strip(b"\0"):
                raise _after_end()

    def drain(self) -> None:
        """Read and drop the rest of the declared body, within the upload's deadline, so
        that the client reads our answer instead of a reset connection."""
        try:
            while self.read(PIECE):
                pass
        except Refusal:
            pass

    def abandon(self) -> None:
        """Read no more from a client too slow to wait for: our answer still goes out,
        and the server finds the rest of the body ended instead of waiting for it."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RD)

    def release(self) -> None:
        """Give the socket back without a timeout, for the next request on it."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.settimeout(None)


def _too_slow() -> Refusal:
    return Refusal(408, "the upload took longer than this server allows", code="timeout")


class _Decoded(io.RawIOBase):
    """A read-only stream of decoded bytes, ``read`` returning at most what is asked."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        data = self._read(len(b))
        b[: len(data)] = data
        return len(data)


def _after_end() -> Refusal:
    return Refusal(400, "the archive has data after its end", code="corrupt")


def _truncated(kind: str) -> Refusal:
    return Refusal(400, f"the {kind} archive is truncated or corrupt", code="corrupt")


def _xz(body: Body, memory: int) -> Callable[[int], bytes]:
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=memory)

    def read(size: int) -> bytes:
        while not decoder.eof:
            data = b""
            if decoder.needs_input:
                data = body.read()
                if not data:
                    raise _truncated("xz")
            try:
                out = decoder.decompress(data, size)
            except lzma.LZMAError as exc:
                if "memory" in str(exc).lower():
                    raise Refusal(
                        413,
                        f"the xz archive needs more than {memory >> 20} MiB of memory to "
                        "decompress; pack it with a smaller preset (ABRT uses xz -2)",
                        code="decoder_memory",
                    ) from exc
                raise Refusal(400, f"the xz archive is corrupt: {exc}", code="corrupt") from exc
            if out:
                return out
        if decoder.unused_data.strip(b"\0"):
            raise _after_end()
        return b""

    return read


def _gzip(body: Body, _memory: int) -> Callable[[int], bytes]:
    decoder = zlib.decompressobj(wbits=31)
    more = False  # the last call filled its output: zlib may hold more for us

    def read(size: int) -> bytes:
        nonlocal more
        while not decoder.eof:
            data = decoder.unconsumed_tail
            if not data and not more:
                data = body.read()
                if not data:
                    raise _truncated("gzip")
            try:
                out = decoder.decompress(data, size)
            except zlib.error as exc:
                raise Refusal(400, f"the gzip archive is corrupt: {exc}", code="corrupt") from exc
            more = len(out) == size
            if out:
                return out
        if decoder.unused_data.strip(b"\0"):
            raise _after_end()
        return b""

    return read


def _zstd(body: Body, memory: int) -> Callable[[int], bytes]:
    # The window is what a zstd frame makes the decoder allocate; refuse big ones.
    reader = zstandard.ZstdDecompressor(max_window_size=memory).stream_reader(
        cast("IO[bytes]", body),  # it only ever calls read()
        read_size=PIECE,
        read_across_frames=False,
        closefd=False,
    )

    def read(size: int) -> bytes:
        try:
            return reader.read(size)
        except zstandard.ZstdError as exc:
            if "memory" in str(exc).lower() or "window" in str(exc).lower():
                raise Refusal(
                    413,
                    f"the zstd archive needs a window over {memory >> 20} MiB",
                    code="decoder_memory",
                ) from exc
            raise Refusal(400, f"the zstd archive is corrupt: {exc}", code="corrupt") from exc

    return read


def _plain(body: Body, _memory: int) -> Callable[[int], bytes]:
    return body.read


class _Prefetch:
    """Runs a decoder in a thread of its own, a few chunks ahead of the tar reader.

    Decompressing (xz above all) is the slow half of an upload and releases the GIL,
    so it overlaps with parsing the tar and writing files, as ``xz | tar`` would.  At
    most ``AHEAD`` chunks wait in memory.
    """

    AHEAD = 4

    def __init__(self, decode: Callable[[int], bytes]) -> None:
        self._decode = decode
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(self.AHEAD)
        self._stopping = threading.Event()
        self._pending = b""
        self._done = False
        self._thread = threading.Thread(target=self._run, name="upload-decoder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            item: bytes | BaseException
            try:
                item = self._decode(CHUNK)
            except BaseException as exc:  # noqa: BLE001 -- handed to the reading thread
                item = exc
            while not self._stopping.is_set():
                try:
                    self._chunks.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    def read(self, size: int) -> bytes:
        """At most ``size`` decoded bytes; ``b""`` at the end; the decoder's error, raised."""
        if not self._pending and not self._done:
            item = self._chunks.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
            self._pending = item
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def stop(self) -> None:
        """Stop decoding and wait for the thread (it may finish reading one piece)."""
        self._stopping.set()
        self._thread.join()


DECODERS: dict[str, Callable[[Body, int], Callable[[int], bytes]]] = {
    "application/x-xz-compressed-tar": _xz,
    "application/x-gzip": _gzip,
    "application/x-tar": _plain,
    "application/zstd": _zstd,
}


@dataclass(frozen=True)
class Crash:
    """What an accepted upload told us."""

    arch: str
    executable: str
    package: str
    files: tuple[str, ...]


def receive(
    body: Body,
    content_type: str,
    dest: Path,
    limits: Limits,
    free_space: FreeSpace,
    opener: Opener = open_new,
) -> Crash:
    """Unpack the archive of ``body`` into ``dest`` and check the problem directory.

    Raises :class:`Refusal` naming what was wrong; ``dest`` may then hold a part
    of the upload, which the caller removes.  Every file is made by ``opener``.
    """
    prefetch = _Prefetch(DECODERS[content_type](body, limits.decoder_memory))
    try:
        crash = _unpack(_Decoded(prefetch.read), dest, limits, free_space, opener)
    finally:
        # Nobody else may read the body (to drain it) while the decoder thread does.
        prefetch.stop()
    body.finish()
    return crash


def _unpack(
    decoded: _Decoded, dest: Path, limits: Limits, free_space: FreeSpace, opener: Opener
) -> Crash:
    seen: set[str] = set()
    writer = _Writer(dest, limits, free_space, opener)
    try:
        with tarfile.open(fileobj=io.BufferedReader(decoded, CHUNK), mode="r|") as tar:
            for member in tar:
                # A sparse member is as big as its header says, not as its stored blocks.
                writer.check_size(member.size)
                name = _check_member(member, seen)
                if name is None:
                    continue
                source = tar.extractfile(member)
                assert source is not None
                writer.write(name, member.size, source)
    except (tarfile.TarError, EOFError) as exc:
        raise Refusal(400, f"the archive is corrupt or truncated: {exc}", code="corrupt") from exc
    # A tar ends with zero blocks that tarfile's stream mode need not read; what
    # follows of a compressed stream must still decode, or the archive was cut.
    trailing = 0
    while data := decoded.read(CHUNK):
        trailing += len(data)
        if trailing > TRAILING_LIMIT:
            raise Refusal(400, "the archive has data after its end", code="corrupt")
    return _check_problem_dir(dest, tuple(sorted(seen)))


class _Writer:
    """Writes members into the crash directory, counting every limit as bytes land."""

    def __init__(
        self, dest: Path, limits: Limits, free_space: FreeSpace, opener: Opener = open_new
    ) -> None:
        self._dest = dest
        self.limits = limits
        self._free_space = free_space
        self._open = opener
        self._total = 0
        self._since_check = 0

    def check_size(self, size: int) -> None:
        """Refuse at once a member whose header already says it takes us past the limit."""
        if self._total + size > self.limits.max_unpacked:
            raise self._too_big()

    def write(self, name: str, size: int, source: IO[bytes]) -> None:
        cap = ACCEPTED_FILES[name]
        if cap and size > cap:
            raise Refusal(403, f"file '{name}' is {size} bytes; at most {cap}", code="file_cap")
        # Other uploads fill the same disk between two looks at its free space: running
        # out while writing (or flushing, at close) is a 507 too.
        with disk_full_refused(f"writing '{name}'"), self._open(self._dest / name) as out:
            while chunk := source.read(CHUNK):
                self._total += len(chunk)
                if self._total > self.limits.max_unpacked:
                    raise self._too_big()
                out.write(chunk)
                self._since_check += len(chunk)
                if self._since_check >= SPACE_CHECK_EVERY:
                    self._since_check = 0
                    check_free_space(self._free_space, self._dest, self.limits.min_free)

    def _too_big(self) -> Refusal:
        mib = self.limits.max_unpacked // MIB
        return Refusal(413, f"the archive unpacks to more than {mib} MiB", code="unpacked_size")


def check_free_space(free_space: FreeSpace, where: Path, min_free: int, coming: int = 0) -> None:
    """Refuse with 507 when ``where`` would be left with less than ``min_free`` bytes."""
    if free_space(where) - coming < min_free:
        raise Refusal(507, "the server is short of disk space; try again later", code="no_space")


def _check_member(member: tarfile.TarInfo, seen: set[str]) -> str | None:
    """The member's file name if it is acceptable, ``None`` for the archive's own "./"."""
    raw = member.name
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise Refusal(
            403, f"archive member {raw!r} has control characters in its name", code="member"
        )
    if raw.startswith("/"):
        raise Refusal(403, f"archive member '{raw}' has an absolute name", code="member")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refusal(403, f"archive member '{raw}' points outside the archive", code="member")
    name = "/".join(parts)
    if not name and member.isdir():
        return None
    kind = _unwanted_kind(member)
    if kind:
        raise Refusal(
            403,
            f"archive member '{name}' is {kind}; only regular files are accepted",
            code="member",
        )
    if name not in ACCEPTED_FILES:
        raise Refusal(
            403,
            f"file '{name}' is not accepted (accepted: {', '.join(ACCEPTED_FILES)})",
            code="member",
        )
    if name in seen:
        raise Refusal(403, f"file '{name}' appears twice in the archive", code="member")
    seen.add(name)
    return name


def _unwanted_kind(member: tarfile.TarInfo) -> str | None:
    kinds = (
        (member.issym, "a symlink"),
        (member.islnk, "a hard link"),
        (member.ischr, "a character device"),
        (member.isblk, "a block device"),
        (member.isfifo, "a FIFO"),
        (member.isdir, "a directory"),
        (member.issparse, "a sparse file"),
    )
    for test, kind in kinds:
        if test():
            return kind
    return None if member.isreg() else "not a regular file"


def _read_line(path: Path, name: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(400, f"file '{name}' is not UTF-8 text", code="metadata") from exc
    return text.strip()


def _check_problem_dir(dest: Path, files: tuple[str, ...]) -> Crash:
    for name in REQUIRED_FILES:
        if name not in files:
            raise Refusal(
                403, f"required file '{name}' is missing from the archive", code="missing"
            )
    executable = _read_line(dest / "executable", "executable")
    if not executable.startswith("/") or any(c in executable for c in "\"'\n\r\0"):
        raise Refusal(
            400, "file 'executable' must hold one absolute path without quotes", code="metadata"
        )
    package = _read_line(dest / "package", "package")
    if parse_nvr(package) is None:
        raise Refusal(
            400,
            f"file 'package' does not hold a package NVR(A): {package[:80]!r}",
            code="metadata",
        )
    try:
        arch = core_arch(dest / "coredump")
    except NotACore as exc:
        raise Refusal(400, f"file 'coredump' is not a core dump: {exc}", code="metadata") from exc
    return Crash(arch=arch, executable=executable, package=package, files=files)
