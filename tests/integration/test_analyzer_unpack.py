"""The analyzer's own RPM unpacker, against ``rpm2cpio | cpio`` on real rpmbuild output."""

from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from services.analyzer.unpack import DIR, FILE, LINK, PayloadError, Unpacked, unpack_rpm
from tests.fixtures.build import Fixtures

pytestmark = pytest.mark.integration

# What rpmbuild writes for each compressor rpm knows; w19.zstdio is Fedora's choice.
PAYLOADS = {
    "zstd": "w19.zstdio",
    "xz": "w6.xzdio",
    "lzma": "w6.lzdio",
    "gzip": "w9.gzdio",
    "bzip2": "w9.bzdio",
    "none": "w.ufdio",
}

SPEC = r"""
Name: odd-files
Version: 1.0
Release: 1
Summary: every kind of payload entry
License: MIT
%description
Files, folders, links, hard links and odd modes.
%global debug_package %{nil}
%install
mkdir -p %{buildroot}/usr/bin %{buildroot}/usr/lib64/odd %{buildroot}/usr/share/odd/empty
printf 'a tool\n' > %{buildroot}/usr/bin/odd-tool
printf 'secret\n' > %{buildroot}/usr/share/odd/private
printf 'runs as its owner\n' > %{buildroot}/usr/bin/odd-setuid
head -c 300000 /dev/urandom > %{buildroot}/usr/lib64/libodd.so.1.0
ln -s libodd.so.1.0 %{buildroot}/usr/lib64/libodd.so.1
ln -s /usr/lib64/libodd.so.1.0 %{buildroot}/usr/lib64/libodd.so
printf 'one inode\n' > %{buildroot}/usr/share/odd/first
ln %{buildroot}/usr/share/odd/first %{buildroot}/usr/share/odd/second
ln %{buildroot}/usr/share/odd/first %{buildroot}/usr/lib64/odd/third
: > %{buildroot}/usr/share/odd/empty-a
ln %{buildroot}/usr/share/odd/empty-a %{buildroot}/usr/share/odd/empty-b
printf 'spaces\n' > "%{buildroot}/usr/share/odd/with spaces"
%files
%attr(0755,root,root) /usr/bin/odd-tool
%attr(4755,root,root) /usr/bin/odd-setuid
%attr(0600,root,root) /usr/share/odd/private
/usr/lib64/libodd.so*
/usr/lib64/odd
%dir /usr/share/odd
%dir /usr/share/odd/empty
/usr/share/odd/first
/usr/share/odd/second
/usr/share/odd/empty-a
/usr/share/odd/empty-b
"/usr/share/odd/with spaces"
"""


@pytest.fixture(scope="module")
def odd_rpms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    top = tmp_path_factory.mktemp("rpmbuild")
    spec = top / "odd-files.spec"
    spec.write_text(SPEC)
    rpms = {}
    for compressor, payload in PAYLOADS.items():
        subprocess.run(
            [
                "rpmbuild", "-bb", "--nodeps", "--quiet",
                "--define", f"_topdir {top}",
                "--define", f"_binary_payload {payload}",
                "--define", f"_rpmdir {top / compressor}",
                str(spec),
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        [rpm] = (top / compressor).glob("*/*.rpm")
        rpms[compressor] = rpm
    return rpms


def compressor_of(rpm: Path) -> str:
    done = subprocess.run(
        ["rpm", "-qp", "--nosignature", "--qf", "%{PAYLOADCOMPRESSOR}", str(rpm)],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return done.stdout


def cpio_tree(rpm: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(
        f"rpm2cpio '{rpm}' | cpio -idm --quiet", shell=True, check=True, cwd=dest, timeout=120
    )
    return dest


def assert_same_as_cpio(unpacked: Unpacked, data: Path, cpio: Path) -> None:
    """Every path cpio made, the unpacker lists alike; every file's data and mode match."""
    listed = {entry.path: entry for entry in unpacked.entries}
    for path in sorted(cpio.rglob("*")):
        name = str(path.relative_to(cpio))
        entry = listed.get(name)
        if path.is_symlink():
            assert entry is not None, name
            assert entry.kind == LINK, name
            assert entry.value == str(path.readlink()), name
        elif path.is_dir():
            assert entry is None or entry.kind == DIR, name  # cpio makes unlisted parents
        else:
            assert entry is not None, name
            assert entry.kind == FILE, name
            ours = data / entry.value
            assert ours.read_bytes() == path.read_bytes(), name
            theirs = path.lstat()
            assert stat.S_IMODE(ours.stat().st_mode) == stat.S_IMODE(theirs.st_mode) & 0o755
            assert int(ours.stat().st_mtime) == int(theirs.st_mtime), name
    made = {str(p.relative_to(cpio)) for p in cpio.rglob("*")}
    assert set(listed) <= made


@pytest.mark.parametrize("compressor", list(PAYLOADS))
def test_each_compressor_unpacks_as_cpio_does(
    odd_rpms: dict[str, Path], compressor: str, tmp_path: Path
) -> None:
    rpm = odd_rpms[compressor]
    if compressor != "none":
        assert compressor_of(rpm) == compressor  # the macro took effect
    data = tmp_path / "data"
    data.mkdir()
    unpacked = unpack_rpm(rpm, data)
    assert_same_as_cpio(unpacked, data, cpio_tree(rpm, tmp_path / "cpio"))
    assert unpacked.warnings == []


def test_hard_links_share_one_data_file_and_set_id_bits_are_dropped(
    odd_rpms: dict[str, Path], tmp_path: Path
) -> None:
    unpacked = unpack_rpm(odd_rpms["zstd"], tmp_path)
    by_path = {entry.path: entry for entry in unpacked.entries}
    first = by_path["usr/share/odd/first"].value
    assert by_path["usr/share/odd/second"].value == first
    assert by_path["usr/lib64/odd/third"].value == first
    assert by_path["usr/share/odd/empty-a"].value == by_path["usr/share/odd/empty-b"].value
    assert (tmp_path / first).read_text() == "one inode\n"
    # Nine regular file names, seven data files: the hard-linked names share theirs.
    assert unpacked.files == len(list(tmp_path.iterdir())) == 7
    assert stat.S_IMODE((tmp_path / by_path["usr/bin/odd-setuid"].value).stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / by_path["usr/share/odd/private"].value).stat().st_mode) == (
        0o600
    )
    assert by_path["usr/lib64/libodd.so"].value == "/usr/lib64/libodd.so.1.0"
    assert by_path["usr/share/odd/empty"].kind == DIR


def test_the_fixture_packages_unpack_as_cpio_does(crash_fixtures: Fixtures, tmp_path: Path) -> None:
    for rpm in crash_fixtures.rpms:
        data = tmp_path / rpm.name / "data"
        data.mkdir(parents=True)
        unpacked = unpack_rpm(rpm.path, data)
        assert_same_as_cpio(unpacked, data, cpio_tree(rpm.path, tmp_path / rpm.name / "cpio"))


def damaged(rpm: Path, dest: Path, edit: str, at: int = 0) -> Path:
    body = bytearray(rpm.read_bytes())
    if edit == "truncate":
        del body[at:]
    elif edit == "flip":
        for offset in range(at, at + 64):
            body[offset] ^= 0xFF
    shutil.copy(rpm, dest)
    dest.write_bytes(bytes(body))
    return dest


def payload_offset(rpm: Path, magic: bytes) -> int:
    """Where the compressed payload starts: its first frame's magic after the headers."""
    return rpm.read_bytes().index(magic, 96 + 16)


@pytest.mark.parametrize(
    ("compressor", "edit", "reason"),
    [
        ("zstd", "truncate", "the payload (cannot be read|ends in the middle of an entry)"),
        ("gzip", "flip", "the payload cannot be read"),  # gzip's CRC at the end sees it
        ("zstd", "flip", "is not the file the mirror recorded"),  # rpm's zstd has no checksum
    ],
)
def test_a_damaged_payload_fails_with_the_rpm_named(
    odd_rpms: dict[str, Path], tmp_path: Path, compressor: str, edit: str, reason: str
) -> None:
    rpm = odd_rpms[compressor]
    start = payload_offset(rpm, {"zstd": b"\x28\xb5\x2f\xfd", "gzip": b"\x1f\x8b"}[compressor])
    at = start + (rpm.stat().st_size - start) // 2
    broken = damaged(rpm, tmp_path / rpm.name, edit, at)
    data = tmp_path / "data"
    data.mkdir()
    digest = hashlib.sha256(rpm.read_bytes()).hexdigest() if compressor == "zstd" else None
    with pytest.raises(PayloadError, match=reason) as caught:
        unpack_rpm(broken, data, digest)
    assert rpm.name in str(caught.value)


def test_a_file_that_is_not_an_rpm_is_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.rpm"
    text.write_text("not a package\n" * 20)
    with pytest.raises(PayloadError, match=r"notes.rpm is not an RPM"):
        unpack_rpm(text, tmp_path)
    with pytest.raises(PayloadError, match=r"gone.rpm cannot be opened"):
        unpack_rpm(tmp_path / "gone.rpm", tmp_path)


def test_an_unknown_compressor_is_named(odd_rpms: dict[str, Path], tmp_path: Path) -> None:
    body = odd_rpms["gzip"].read_bytes()
    assert body.count(b"gzip\0") == 1
    renamed = tmp_path / "lzip.rpm"
    renamed.write_bytes(body.replace(b"gzip\0", b"lzip\0"))
    with pytest.raises(PayloadError, match=r"lzip.rpm: the payload compressor 'lzip'"):
        unpack_rpm(renamed, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["lzip.rpm"]
