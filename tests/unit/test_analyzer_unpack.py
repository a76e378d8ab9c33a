"""The RPM unpacker on payloads written by hand: what rpmbuild never writes, a hostile file may."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from services.analyzer.unpack import DIR, FILE, LINK, Entry, PayloadError, fill_rpm, unpack_rpm
from services.common.rpmfile import HASH_ASIDE_FROM

REG, DIRECTORY, SYMLINK, CHARDEV = 0o100644, 0o040755, 0o120777, 0o020644


def newc(
    name: str | bytes,
    mode: int,
    data: bytes = b"",
    *,
    inode: int = 0,
    links: int = 1,
    raw_fields: dict[int, bytes] | None = None,
) -> bytes:
    """One cpio "new ASCII" entry, padded to 4 bytes (payloads start aligned)."""
    encoded = (name.encode() if isinstance(name, str) else name) + b"\0"
    values = [inode, mode, 0, 0, links, 1_700_000_000, len(data), 0, 0, 0, 0, len(encoded), 0]
    fields = [b"%08X" % value for value in values]
    for index, raw in (raw_fields or {}).items():
        fields[index] = raw
    entry = b"070701" + b"".join(fields) + encoded
    entry += b"\0" * (-len(entry) % 4)
    return entry + data + b"\0" * (-len(data) % 4)


def header(tags: list[tuple[int, int, bytes]]) -> bytes:
    """An RPM header structure: (tag, type, value) entries and their data store."""
    index, store = b"", b""
    for tag, kind, value in tags:
        store += b"\0" * (-len(store) % 8)
        index += struct.pack(">IIII", tag, kind, len(store), 1)
        store += value
    return b"\x8e\xad\xe8\x01\0\0\0\0" + struct.pack(">II", len(tags), len(store)) + index + store


def rpm(
    path: Path, entries: list[bytes], declared: int | None = None, compressor: bytes = b"gzip"
) -> Path:
    payload = b"".join(entries) + newc("TRAILER!!!", 0)
    data = sum(len(e) for e in entries) if declared is None else declared
    signature = header([])
    signature += b"\0" * (-len(signature) % 8)
    tags = [(1124, 6, b"cpio\0"), (1125, 6, compressor + b"\0")]
    if declared != -1:
        tags.append((1009, 4, struct.pack(">I", data)))
    lead = b"\xed\xab\xee\xdb" + b"\0" * 92
    path.write_bytes(lead + signature + header(tags) + gzip.compress(payload))
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def test_hard_links_share_data_whether_it_comes_first_or_last(tmp_path: Path, dest: Path) -> None:
    package = rpm(
        tmp_path / "links.rpm",
        [
            newc("./a/first", REG, b"", inode=7, links=2),
            newc("./a/second", REG, b"data of 7", inode=7, links=2),
            newc("./b/first", REG, b"data of 9", inode=9, links=2),
            newc("./b/second", REG, b"", inode=9, links=2),
        ],
    )
    unpacked = unpack_rpm(package, dest)
    by_path = {e.path: e for e in unpacked.entries}
    assert by_path["a/first"].value == by_path["a/second"].value
    assert by_path["b/first"].value == by_path["b/second"].value
    assert (dest / by_path["a/first"].value).read_bytes() == b"data of 7"
    assert (dest / by_path["b/second"].value).read_bytes() == b"data of 9"
    assert unpacked.files == 2


def test_only_the_files_asked_for_are_written_and_the_rest_can_be_filled_later(
    tmp_path: Path, dest: Path
) -> None:
    package = rpm(
        tmp_path / "debuginfo.rpm",
        [
            newc("./usr/lib/debug", DIRECTORY),
            newc("./usr/lib/debug/.build-id/ab/cd.debug", SYMLINK, b"../../one.debug"),
            newc("./usr/lib/debug/one.debug", REG, b"debug data of one"),
            newc("./usr/lib/debug/two.debug", REG, b"debug data of two, longer"),
            # A hard-linked pair whose data comes with the last name, as rpm writes it.
            newc("./usr/lib/debug/three.debug", REG, b"", inode=5, links=2),
            newc("./usr/lib/debug/three-again.debug", REG, b"data of three", inode=5, links=2),
        ],
    )
    only = frozenset({"usr/lib/debug/one.debug", "usr/lib/debug/three.debug"})
    partial = unpack_rpm(package, dest, only=only)
    by_path = {e.path: e for e in partial.entries}
    # Every path is listed, links and folders too, whatever was written.
    assert set(by_path) == {
        "usr/lib/debug",
        "usr/lib/debug/.build-id/ab/cd.debug",
        "usr/lib/debug/one.debug",
        "usr/lib/debug/two.debug",
        "usr/lib/debug/three.debug",
        "usr/lib/debug/three-again.debug",
    }
    one, two = by_path["usr/lib/debug/one.debug"], by_path["usr/lib/debug/two.debug"]
    three = by_path["usr/lib/debug/three.debug"]
    assert (dest / one.value).read_bytes() == b"debug data of one"
    assert (dest / three.value).read_bytes() == b"data of three"  # by its other name
    assert not (dest / two.value).exists()
    assert partial.absent == {two.value}
    assert partial.size == len(b"debug data of one") + len(b"data of three") + len(
        b"../../one.debug"
    )

    written = fill_rpm(package, dest, None, frozenset({two.value}))
    assert written == len(b"debug data of two, longer")
    assert (dest / two.value).read_bytes() == b"debug data of two, longer"
    assert (dest / one.value).read_bytes() == b"debug data of one"  # left as it was
    assert not list(dest.glob(".fill-*"))

    # The names of the data are the same on every reading, whatever is kept.
    again = tmp_path / "again"
    again.mkdir()
    assert unpack_rpm(package, again).entries == partial.entries


def test_a_wanted_name_whose_data_came_earlier_is_listed_as_absent(
    tmp_path: Path, dest: Path
) -> None:
    package = rpm(
        tmp_path / "first.rpm",
        [
            newc("./b/first", REG, b"data of 9", inode=9, links=2),
            newc("./b/second", REG, b"", inode=9, links=2),
        ],
    )
    unpacked = unpack_rpm(package, dest, only=frozenset({"b/second"}))
    data = {e.path: e.value for e in unpacked.entries}["b/second"]
    # Not silently lost: the caller sees it absent and fills it.
    assert unpacked.absent == {data}
    fill_rpm(package, dest, None, frozenset(unpacked.absent))
    assert (dest / data).read_bytes() == b"data of 9"


def test_names_are_made_relative_and_never_climb_out(tmp_path: Path, dest: Path) -> None:
    package = rpm(
        tmp_path / "names.rpm",
        [
            newc("/usr/bin/absolute", REG, b"x"),
            newc("./usr/../../etc/passwd", REG, b"x"),
            newc("./", DIRECTORY),
            newc("./usr//lib/./x", REG, b"x"),
        ],
    )
    unpacked = unpack_rpm(package, dest)
    assert [e.path for e in unpacked.entries] == ["usr/bin/absolute", "usr/lib/x"]
    assert unpacked.warnings == [
        f"{package.name}: /usr/../../etc/passwd climbs out with ..; skipped"
    ]


def test_what_cannot_be_placed_is_skipped_with_a_warning(tmp_path: Path, dest: Path) -> None:
    package = rpm(
        tmp_path / "odd.rpm",
        [
            newc("./dev/null", CHARDEV),
            newc(b"./dev/\xff", CHARDEV),
            newc("./usr/lib/empty-link", SYMLINK, b""),
            newc("./usr/lib/nul-link", SYMLINK, b"lib\0c.so"),
            newc("./usr/share/" + "n" * 300, REG, b"x"),
            newc("./" + "d/" * 200 + "deep", REG, b"x"),
            newc("./usr/lib/fine", SYMLINK, b"libc.so.6"),
        ],
    )
    unpacked = unpack_rpm(package, dest)
    assert unpacked.entries == [Entry(LINK, "usr/lib/fine", "libc.so.6")]
    odd_link = "is a link with an empty or NUL-bearing target; skipped"
    assert unpacked.warnings == [
        f"{package.name}: /dev/null is a device, FIFO or socket; skipped",
        f"{package.name}: /dev/\\xff is a device, FIFO or socket; skipped",
        f"{package.name}: /usr/lib/empty-link {odd_link}",
        f"{package.name}: /usr/lib/nul-link {odd_link}",
        f"{package.name}: /usr/share/{'n' * 300} has a name part over 255 bytes; skipped",
        f"{package.name}: /{'d/' * 200}deep lies deeper than 128 folders; skipped",
    ]
    json.dumps(unpacked.warnings).encode("utf-8")  # a task's log can hold them
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("size", [b"-0000001", b"0x00FFFF", b"+0000010", b" 0000010"])
def test_a_cpio_header_that_is_not_plain_hex_is_refused(
    tmp_path: Path, dest: Path, size: bytes
) -> None:
    package = rpm(tmp_path / "bad.rpm", [newc("./x", REG, b"x", raw_fields={6: size})])
    with pytest.raises(PayloadError, match=r"bad.rpm: a cpio header is damaged"):
        unpack_rpm(package, dest)


def test_a_payload_holding_more_than_its_header_declares_is_refused(
    tmp_path: Path, dest: Path
) -> None:
    big = rpm(tmp_path / "big.rpm", [newc("./x", REG, b"\0" * (4 << 20))], declared=1000)
    with pytest.raises(PayloadError, match=r"big.rpm: the payload holds more than its header"):
        unpack_rpm(big, dest)
    unsized = rpm(tmp_path / "unsized.rpm", [newc("./x", REG, b"x")], declared=-1)
    with pytest.raises(PayloadError, match=r"unsized.rpm: the header does not say how large"):
        unpack_rpm(unsized, dest)


def test_a_plain_payload_is_read_as_it_is(tmp_path: Path, dest: Path) -> None:
    package = rpm(tmp_path / "plain.rpm", [newc("./usr", DIRECTORY), newc("./usr/x", REG, b"x")])
    unpacked = unpack_rpm(package, dest)
    assert [(e.kind, e.path) for e in unpacked.entries] == [(DIR, "usr"), (FILE, "usr/x")]


def test_a_large_rpm_hashed_beside_the_unpacking_is_still_checked(
    tmp_path: Path, dest: Path
) -> None:
    # Large enough to be hashed by a thread of its own (HASH_ASIDE_FROM), as a big
    # debuginfo RPM is; random data, so that compression keeps it large.
    data = os.urandom(HASH_ASIDE_FROM + 4096)
    package = rpm(tmp_path / "large.rpm", [newc("./usr/lib/big.debug", REG, data)])
    assert package.stat().st_size >= HASH_ASIDE_FROM
    digest = hashlib.sha256(package.read_bytes()).hexdigest()
    descriptors = len(list(Path("/proc/self/fd").iterdir()))
    unpacked = unpack_rpm(package, dest, digest)
    assert (dest / unpacked.entries[0].value).read_bytes() == data
    other = tmp_path / "other"
    other.mkdir()
    wrong = "0" * 64
    with pytest.raises(PayloadError, match=f"its sha256 is {digest}, not {wrong}"):
        unpack_rpm(package, other, wrong)
    assert len(list(Path("/proc/self/fd").iterdir())) == descriptors  # the hashing thread's closed


def test_a_fill_from_an_rpm_that_is_not_the_one_recorded_writes_nothing(
    tmp_path: Path, dest: Path
) -> None:
    entries = [
        newc("./usr/lib/debug/one.debug", REG, b"one"),
        newc("./usr/lib/debug/two.debug", REG, b"two"),
    ]
    package = rpm(tmp_path / "debuginfo.rpm", entries)
    digest = hashlib.sha256(package.read_bytes()).hexdigest()
    partial = unpack_rpm(package, dest, digest, only=frozenset({"usr/lib/debug/one.debug"}))
    (two,) = partial.absent
    # The repository's file was replaced by another one since.
    rpm(package, [entries[0], newc("./usr/lib/debug/two.debug", REG, b"not two")])
    with pytest.raises(PayloadError, match="is not the file the mirror recorded"):
        fill_rpm(package, dest, digest, frozenset({two}))
    assert sorted(p.name for p in dest.iterdir()) == [
        {e.path: e.value for e in partial.entries}["usr/lib/debug/one.debug"]
    ]
