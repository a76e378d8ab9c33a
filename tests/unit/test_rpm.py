"""Reading build-id entries and dist tags from RPM headers."""

from services.common.data.mirror import BuildIdKind, IndexEntry
from services.common.rpm import build_id_entry, os_release_of

BID = "0123456789abcdef0123456789abcdef01234567"


def test_a_binary_build_id_link_names_the_real_file() -> None:
    entry = build_id_entry(f"/usr/lib/.build-id/01/{BID[2:]}", "../../../../usr/bin/crasher")
    assert entry == IndexEntry(BID, BuildIdKind.BINARY, "/usr/bin/crasher")


def test_a_debug_build_id_link_names_the_debug_file() -> None:
    entry = build_id_entry(
        f"/usr/lib/debug/.build-id/01/{BID[2:]}.debug",
        "../../usr/bin/crasher-1.0-1.fc40.x86_64.debug",
    )
    assert entry == IndexEntry(
        BID, BuildIdKind.DEBUG, "/usr/lib/debug/usr/bin/crasher-1.0-1.fc40.x86_64.debug"
    )


def test_a_debug_file_stored_under_its_build_id_names_itself() -> None:
    path = f"/usr/lib/debug/.build-id/01/{BID[2:]}.debug"
    assert build_id_entry(path, "") == IndexEntry(BID, BuildIdKind.DEBUG, path)


def test_a_debuginfo_link_back_to_the_binary_names_the_binarys_path() -> None:
    # With %_build_id_links alldebug it is the only thing that says where the binary is.
    entry = build_id_entry(f"/usr/lib/debug/.build-id/01/{BID[2:]}", "../../../../../usr/bin/x")
    assert entry == IndexEntry(BID, BuildIdKind.BINARY_PATH, "/usr/bin/x")


def test_links_that_are_not_build_id_entries_are_ignored() -> None:
    assert build_id_entry("/usr/lib/.build-id", "") is None
    assert build_id_entry("/usr/bin/crasher", "") is None


def test_the_os_release_comes_from_the_dist_tag() -> None:
    assert os_release_of("1.fc40") == "fedora-40"
    assert os_release_of("3.fc41.1") == "fedora-41"
    assert os_release_of("9.deb12u14.fc40") == "fedora-40"
    assert os_release_of("1.el9") is None
    assert os_release_of("1") is None
