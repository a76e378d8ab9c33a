"""Release strings as ABRT's client spells them, and how ``X-OS-Release`` is read."""

from __future__ import annotations

from services.intake.releases import ClientRelease, package_arches, spell, supported


def test_releases_are_spelled_as_the_client_builds_its_own() -> None:
    assert spell("fedora-40", "x86_64", 0) == "fedora-40-x86_64"
    assert spell("fedora-40", "i686", 0) == "fedora-40-i386"
    assert spell("fedora-42", "x86_64", 42) == "fedora-rawhide-x86_64"
    assert spell("fedora-41", "aarch64", 42) == "fedora-41-aarch64"
    assert spell("epel-9", "x86_64", 42) == "epel-9-x86_64"


def test_supported_releases_are_newest_first_once_each_and_x86_64_first() -> None:
    pairs = [
        ("fedora-9", "x86_64"),
        ("epel-9", "x86_64"),
        ("fedora-40", "aarch64"),
        ("fedora-40", "x86_64"),
        ("fedora-43", "x86_64"),
        ("fedora-42", "x86_64"),
        ("fedora-40", "x86_64"),
    ]
    assert supported(pairs, 42) == [
        "fedora-rawhide-x86_64",
        "fedora-40-x86_64",
        "fedora-40-aarch64",
        "epel-9-x86_64",
        "fedora-9-x86_64",
    ]


def test_an_x_os_release_names_the_stores_releases() -> None:
    named = ClientRelease.parse("fedora-40-i386")
    assert named == ClientRelease("fedora", "40", "i386")
    assert named.os_releases({"fedora-41"}, 42) == {"fedora-40"}
    rawhide = ClientRelease.parse("fedora-rawhide-x86_64")
    assert rawhide is not None
    assert str(rawhide) == "fedora-rawhide-x86_64"
    known = {"fedora-40", "fedora-42", "fedora-43", "epel-43"}
    assert rawhide.os_releases(known, 42) == {"fedora-42", "fedora-43"}
    assert rawhide.os_releases(known, 0) == set()
    for bad in ("Fedora 40", "fedora-40", "fedora--x86_64", ""):
        assert ClientRelease.parse(bad) is None, bad


def test_package_architectures_come_in_families() -> None:
    assert package_arches("i386") == package_arches("i686")
    assert package_arches("i686") == frozenset({"i386", "i486", "i586", "i686", "noarch"})
    assert package_arches("x86_64") == frozenset({"x86_64", "noarch"})
    assert package_arches("noarch") is None
