"""Assembling a task's root from unpacked packages."""

from __future__ import annotations

from pathlib import Path

from services.analyzer.rootcache import _link_tree


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
