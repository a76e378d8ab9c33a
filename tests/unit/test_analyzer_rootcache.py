"""Assembling a task's root from unpacked packages."""

from __future__ import annotations

from pathlib import Path

from services.analyzer.coredump import Module
from services.analyzer.resolve import Resolution, Served
from services.analyzer.rootcache import _link_tree
from services.common.store import Nevra, Package


def test_absolute_links_stay_inside_the_root(tmp_path: Path) -> None:
    package = tmp_path / "unpacked"
    (package / "usr/lib64").mkdir(parents=True)
    (package / "usr/lib64/libfoo.so.1").write_text("the crashed machine's library")
    (package / "usr/lib64/libfoo.so").symlink_to("/usr/lib64/libfoo.so.1")
    root = tmp_path / "root"
    warnings: list[str] = []
    _link_tree(package, root, warnings, "foo-1-1.x86_64")
    link = root / "usr/lib64/libfoo.so"
    assert not link.readlink().is_absolute()
    assert link.read_text() == "the crashed machine's library"
    assert warnings == []


def test_debugsource_packages_stay_out_of_roots() -> None:
    def pkg(number: int, name: str) -> Package:
        return Package(number, Nevra(name, 0, "1", "1", "x86_64"), "f40", f"{name}.rpm", "0", 1)

    module = Module(0, 1, "ab", "/usr/bin/crasher")
    resolution = Resolution(
        served=[Served(module, pkg(1, "crasher"), pkg(2, "crasher-debuginfo"))],
        extra=[pkg(3, "crasher-debugsource")],
    )
    assert [p.nevra.name for p in resolution.packages] == ["crasher", "crasher-debuginfo"]
