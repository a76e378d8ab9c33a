"""Reading build-id entries and dist tags from RPM headers."""

from services.common.rpm import _build_id_entry, os_release_of
from services.common.store import BuildIdKind

BID = "0123456789abcdef0123456789abcdef01234567"


def test_a_binary_build_id_link_names_the_real_file() -> None:
    entry = _build_id_entry(f"/usr/lib/.build-id/01/{BID[2:]}", "../../../../usr/bin/crasher")
    assert entry == (BID, BuildIdKind.BINARY, "/usr/bin/crasher")


def test_a_debug_build_id_link_names_the_debug_file() -> None:
    entry = _build_id_entry(
        f"/usr/lib/debug/.build-id/01/{BID[2:]}.debug",
        "../../usr/bin/crasher-1.0-1.fc40.x86_64.debug",
    )
    assert entry == (
        BID,
        BuildIdKind.DEBUG,
        "/usr/lib/debug/usr/bin/crasher-1.0-1.fc40.x86_64.debug",
    )


def test_a_debug_file_stored_under_its_build_id_names_itself() -> None:
    path = f"/usr/lib/debug/.build-id/01/{BID[2:]}.debug"
    assert _build_id_entry(path, "") == (BID, BuildIdKind.DEBUG, path)


def test_links_that_are_not_build_id_entries_are_ignored() -> None:
    # In a debuginfo package, "<id>" without ".debug" points back at the binary.
    assert _build_id_entry(f"/usr/lib/debug/.build-id/01/{BID[2:]}", "x") is None
    assert _build_id_entry("/usr/lib/.build-id", "") is None
    assert _build_id_entry("/usr/bin/crasher", "") is None


def test_the_os_release_comes_from_the_dist_tag() -> None:
    assert os_release_of("1.fc40") == "fedora-40"
    assert os_release_of("3.fc41.1") == "fedora-41"
    assert os_release_of("9.deb12u14.fc40") == "fedora-40"
    assert os_release_of("1.el9") is None
    assert os_release_of("1") is None
