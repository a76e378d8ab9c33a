"""Assembling a task's root from unpacked packages."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from services.analyzer.coredump import Module
from services.analyzer.packages import Finder, Resolution, Served
from services.analyzer.rootcache import RootCache, UnpackedPackage, _Layout
from services.analyzer.unpack import DIR, FILE, LINK, Entry
from services.common.data.mirror import MirrorData, Nevra, Package
from services.common.rpmfile import RpmHeader


def cached(folder: Path, entries: list[Entry], data: dict[str, str]) -> UnpackedPackage:
    """A package as the cache holds it: flat data files and a list of paths."""
    folder.mkdir()
    for name, text in data.items():
        (folder / name).write_text(text)
    return UnpackedPackage(folder, 0, (), tuple(entries))


def test_absolute_links_stay_inside_the_root(tmp_path: Path) -> None:
    package = cached(
        tmp_path / "foo",
        [
            Entry(DIR, "usr/lib64"),
            Entry(FILE, "usr/lib64/libfoo.so.1", "0"),
            Entry(LINK, "usr/lib64/libfoo.so", "/usr/lib64/libfoo.so.1"),
        ],
        {"0": "the crashed machine's library"},
    )
    layout = _Layout(tmp_path / "root")
    layout.place(package, "foo-1-1.x86_64")
    link = tmp_path / "root/usr/lib64/libfoo.so"
    assert not link.readlink().is_absolute()
    assert link.read_text() == "the crashed machine's library"
    assert (tmp_path / "root/usr/lib64/libfoo.so.1").stat().st_ino == (
        (tmp_path / "foo/0").stat().st_ino
    )
    assert layout.warnings == []


def test_paths_under_another_packages_folder_link_land_where_it_leads(tmp_path: Path) -> None:
    filesystem = cached(
        tmp_path / "filesystem",
        [Entry(DIR, "usr/lib64"), Entry(LINK, "lib64", "usr/lib64")],
        {},
    )
    old_style = cached(
        tmp_path / "old",
        [
            Entry(FILE, "lib64/libold.so.1.0", "0"),
            Entry(LINK, "lib64/libold.so.1", "/lib64/libold.so.1.0"),
            Entry(DIR, "lib64/old"),
            Entry(FILE, "lib64/old/plugin.so", "1"),
            # From /lib64, really /usr/lib64: ../share is /usr/share on that machine.
            Entry(LINK, "lib64/data-relative", "../share/old/data"),
            Entry(LINK, "lib64/data-absolute", "/usr/share/old/data"),
            Entry(FILE, "usr/share/old/data", "2"),
        ],
        {"0": "old library", "1": "plugin", "2": "shared data"},
    )
    layout = _Layout(tmp_path / "root")
    layout.place(filesystem, "filesystem-3-1.x86_64")
    layout.place(old_style, "old-1-1.x86_64")
    root = tmp_path / "root"
    assert (root / "usr/lib64/libold.so.1").read_text() == "old library"
    assert (root / "lib64/libold.so.1").read_text() == "old library"
    assert (root / "usr/lib64/old/plugin.so").read_text() == "plugin"
    assert (root / "lib64/data-relative").read_text() == "shared data"
    assert (root / "lib64/data-absolute").read_text() == "shared data"
    assert (root / "usr/lib64/data-absolute").readlink() == Path("../share/old/data")
    assert layout.warnings == []


def test_links_climbing_out_of_the_root_stop_at_it_as_at_slash(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    package = cached(
        tmp_path / "evil",
        [
            Entry(LINK, "etc", str(outside)),
            Entry(LINK, "up", "../.."),
            Entry(DIR, "usr/lib"),
            Entry(LINK, "usr/lib/libc.so.6", "/../../../../../../usr/lib64/libc.so.6"),
            Entry(LINK, "usr/lib/far", "../../../../../../../../../etc"),
            Entry(FILE, "etc/passwd", "0"),
            Entry(FILE, "up/escaped", "0"),
        ],
        {"0": "written through a link"},
    )
    layout = _Layout(tmp_path / "root")
    layout.place(package, "evil-1-1.x86_64")
    root = tmp_path / "root"
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escaped").exists()
    # On the crashed machine /up/../.. is /; here it is the root.
    assert (root / "up").resolve() == root.resolve()
    assert (root / "escaped").read_text() == "written through a link"
    assert (root / "usr/lib/libc.so.6").readlink() == Path("../lib64/libc.so.6")
    assert (root / "usr/lib/far").readlink() == Path("../../etc")
    # The absolute link now points inside the root, where nothing is.
    assert layout.warnings == ["evil-1-1.x86_64: /etc is not a folder here; skipped"]


def test_a_folder_link_leading_out_of_the_root_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    package = cached(tmp_path / "p", [Entry(FILE, "planted/x", "0")], {"0": "x"})
    layout = _Layout(tmp_path / "root")
    (tmp_path / "root/planted").symlink_to(outside)  # however it got there
    layout.place(package, "p-1-1.x86_64")
    assert list(outside.iterdir()) == []
    assert layout.warnings == ["p-1-1.x86_64: /planted leads outside the root; skipped"]


def test_the_first_package_to_ship_a_path_wins(tmp_path: Path) -> None:
    first = cached(tmp_path / "a", [Entry(FILE, "usr/bin/tool", "0")], {"0": "first"})
    second = cached(
        tmp_path / "b",
        [Entry(FILE, "usr/bin/tool", "0"), Entry(DIR, "usr/bin/tool")],
        {"0": "second"},
    )
    layout = _Layout(tmp_path / "root")
    layout.place(first, "a-1-1.x86_64")
    layout.place(second, "b-1-1.x86_64")
    assert (tmp_path / "root/usr/bin/tool").read_text() == "first"
    assert layout.warnings == ["b-1-1.x86_64: /usr/bin/tool is not a folder here; skipped"]


def test_a_package_finds_its_files_through_its_own_links(tmp_path: Path) -> None:
    package = cached(
        tmp_path / "debug",
        [
            Entry(DIR, "usr/lib/debug/.build-id/ab"),
            Entry(FILE, "usr/lib/debug/usr/bin/tool-1-1.x86_64.debug", "0"),
            Entry(
                LINK, "usr/lib/debug/.build-id/ab/cdef.debug", "../../usr/bin/tool-1-1.x86_64.debug"
            ),
            Entry(LINK, "usr/lib/debug/.build-id/ab/cdef", "/usr/bin/tool"),
            Entry(LINK, "loop", "loop"),
        ],
        {"0": "DWARF"},
    )
    assert package.find("/usr/lib/debug/.build-id/ab/cdef.debug") == tmp_path / "debug/0"
    assert package.find("/usr/lib/debug/.build-id/ab/cdef") is None  # in another package
    assert package.find("/loop") is None
    assert package.find("/usr/lib/debug/.build-id/ab") is None
    assert package.find("/usr/lib/debug/usr/bin/tool-1-1.x86_64.debug") == tmp_path / "debug/0"


def test_debugsource_packages_stay_out_of_roots() -> None:
    def pkg(number: int, name: str) -> Package:
        return Package(number, Nevra(name, 0, "1", "1", "x86_64"), "f40", f"{name}.rpm", "0", 1)

    module = Module(0, 1, "ab", "/usr/bin/crasher")
    resolution = Resolution(
        served=[Served(module, pkg(1, "crasher"), pkg(2, "crasher-debuginfo"))],
        extra=[pkg(3, "crasher-debugsource")],
    )
    assert [p.nevra.name for p in resolution.packages] == ["crasher", "crasher-debuginfo"]


def test_a_path_too_long_for_the_disk_is_skipped_with_a_warning(tmp_path: Path) -> None:
    long = "/".join([f"{n:02d}" + "l" * 248 for n in range(20)])  # 5019 bytes: past PATH_MAX
    package = cached(tmp_path / "long", [Entry(FILE, f"{long}/f", "0")], {"0": "x"})
    layout = _Layout(tmp_path / "root")
    layout.place(package, "long-1-1.x86_64")
    [warning] = layout.warnings
    assert warning.startswith("long-1-1.x86_64: /00lll")
    assert warning.endswith("cannot be made here (File name too long); skipped")


def test_a_root_is_not_built_past_a_problem_of_the_disk(tmp_path: Path) -> None:
    # The cached data of a file is gone: that is no package's doing.
    package = cached(tmp_path / "p", [Entry(FILE, "usr/bin/tool", "0")], {})
    layout = _Layout(tmp_path / "root")
    with pytest.raises(FileNotFoundError):
        layout.place(package, "p-1-1.x86_64")


class HeadersOnly(RootCache):
    """A root cache whose packages' headers list ``files`` (the finder reads nothing else
    when it narrows a root); the real cache on the fixture RPMs is the integration tests'."""

    def __init__(self, folder: Path, files: dict[str, tuple[str, ...]]) -> None:
        super().__init__(folder / "cache", folder / "repo")
        self._listed = files

    def header(self, package: Package) -> RpmHeader:
        files = self._listed[package.path]
        nevra = package.nevra
        return RpmHeader(
            nevra.name, 0, nevra.version, nevra.release, nevra.arch, None, files,
            ("",) * len(files), "zstd", 0,
        )  # fmt: skip


def test_a_root_takes_the_debug_files_named_their_gdb_scripts_and_the_dwz_files(
    tmp_path: Path,
) -> None:
    def pkg(number: int, name: str) -> Package:
        return Package(number, Nevra(name, 0, "1", "1", "x86_64"), "f40", f"{name}.rpm", "0", 1)

    debug = "/usr/lib/debug/usr/lib64/libtool.so.1-1-1.x86_64.debug"
    dwz = "/usr/lib/debug/.dwz/tool-1-1.x86_64"
    cache = HeadersOnly(
        tmp_path,
        {
            "tool-debuginfo.rpm": (
                debug,
                f"{debug}-gdb.py",
                "/usr/lib/debug/usr/bin/other-1-1.x86_64.debug",
                "/usr/lib/debug/usr/bin/other-1-1.x86_64.debug-gdb.py",
                dwz,
            ),
        },
    )
    finder = Finder(cast(MirrorData, None), cache, "x86_64")  # narrowing reads no index
    library = Module(0, 1, "ab", "/usr/lib64/libtool.so.1")
    program = Module(2, 1, "cd", "/usr/bin/tool")
    both = pkg(3, "tool-both")  # a package that is a binary here and a debuginfo there
    unnamed = pkg(4, "other-debuginfo")  # its debug file's path is not known
    resolution = Resolution(
        served=[
            Served(library, pkg(1, "tool-libs"), pkg(2, "tool-debuginfo"), debug_path=debug),
            Served(program, both, unnamed),
            Served(Module(4, 1, "ef", "/usr/bin/both"), pkg(5, "x"), both, debug_path=debug),
        ],
    )
    finder.narrow(resolution)
    assert resolution.only == {2: frozenset({debug, f"{debug}-gdb.py", dwz})}
