"""One NVR parser for every part (schemas/nvr.py)."""

from __future__ import annotations

import pytest

from schemas.nvr import Nvr, parse_nvr


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("crasher-1.0-1.fc40", Nvr("crasher", "1.0", "1.fc40")),
        ("crasher-1.0-1.fc40.x86_64", Nvr("crasher", "1.0", "1.fc40", arch="x86_64")),
        ("foo-cli-4.2-3.fc40", Nvr("foo-cli", "4.2", "3.fc40")),
        ("bash-2:5.2.26-3.fc40.i686", Nvr("bash", "5.2.26", "3.fc40", epoch=2, arch="i686")),
        ("glibc-2.36-9.fc40.noarch", Nvr("glibc", "2.36", "9.fc40", arch="noarch")),
        # A dotted release that only looks like an arch stays whole.
        ("kernel-6.1-1.fc40.1", Nvr("kernel", "6.1", "1.fc40.1")),
    ],
)
def test_nvrs_and_nevras_are_read_one_way(text: str, parsed: Nvr) -> None:
    assert parse_nvr(text) == parsed
    assert str(parse_nvr(text)) == f"{parsed.name}-{parsed.version}-{parsed.release}"


@pytest.mark.parametrize(
    "text", ["", "crasher", "crasher-1.0", "/usr/bin/x-1-2", "a b-1-2", "x-1:-2", "x-" * 300]
)
def test_what_is_not_an_nvr_is_none(text: str) -> None:
    assert parse_nvr(text) is None
