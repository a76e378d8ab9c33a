"""The fetcher against a Koji stand-in: real koji client, real RPMs, createrepo_c and dnf."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.messages import Message, MirrorAction, MirrorBuildV1
from schemas.topology import Route
from services.common.runner import run
from services.common.settings import MirrorSettings
from services.mirror.fetcher import BadDownload, Fetcher, NotSignedYet, UnknownBuild
from services.mirror.koji import KojiHub, KojiUnavailable
from services.mirror.retention import prune
from tests.data import Data
from tests.fixtures.build import Fixtures
from tests.integration.koji_hub import KojiStandIn, build_rpms
from tests.integration.stack import free_port

pytestmark = pytest.mark.integration

CRASHER, GLIBC, FILESYSTEM, NOARCH, IMAGE, FAILED, ARCHIVED = 101, 102, 103, 104, 105, 106, 107


@pytest.fixture(scope="module")
def koji(
    tmp_path_factory: pytest.TempPathFactory, crash_fixtures: Fixtures
) -> Iterator[KojiStandIn]:
    root = tmp_path_factory.mktemp("koji")
    stand_in = KojiStandIn(root)
    by_source: dict[str, list[Path]] = {}
    for rpm in crash_fixtures.rpms:
        by_source.setdefault(rpm.sourcerpm, []).append(rpm.path)
    for build_id, name in ((CRASHER, "crasher"), (GLIBC, "glibc"), (FILESYSTEM, "filesystem")):
        source = next(s for s in by_source if s.startswith(f"{name}-"))
        stand_in.add_build(build_id, by_source[source])
    stand_in.add_build(NOARCH, build_rpms(root, "noarchy", 3))
    stand_in.add_build(IMAGE, [], types={"image": {"arch": "x86_64"}})
    stand_in.add_build(FAILED, build_rpms(root, "failing", 1), state=3)
    stand_in.add_build(ARCHIVED, build_rpms(root, "oldie", 2, arch="x86_64"), volume="archive")
    yield stand_in.start()
    stand_in.stop()


class Events:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def __call__(self, route: Route, message: Message, arch: str | None) -> None:
        del route, arch
        self.sent.append(message)


def make_fetcher(
    home: Path, koji: KojiStandIn, gpg_keys: tuple[Path, ...] = (), **settings: object
) -> tuple[Fetcher, Data, Events, Path]:
    store = Data.from_url(f"sqlite:///{home}/retrace.sqlite3")
    store.migrate()
    repo = home / "repo"
    events = Events()
    fetcher = Fetcher(
        store.mirror,
        repo,
        MirrorSettings(**settings),  # type: ignore[arg-type]
        KojiHub(koji.hub_url, koji.top_url, timeout=10),
        events,
        gpg_keys=gpg_keys,
    )
    return fetcher, store, events, repo


def repo_files(repo: Path) -> list[str]:
    return sorted(
        str(p.relative_to(repo))
        for p in repo.rglob("*")
        if p.is_file() and "repodata" not in p.parts
    )


def repoquery(folder: Path, *specs: str) -> list[str]:
    """What dnf finds in the repository at ``folder``: file names."""
    listed = run(
        [
            "dnf",
            "--quiet",
            "--disablerepo=*",
            f"--repofrompath=q,file://{folder}",
            "--enablerepo=q",
            "--setopt=q.metadata_expire=0",
            f"--setopt=cachedir={folder.parent / '.dnf-cache'}",
            "repoquery",
            "--location",
            *specs,
        ],
        timeout=300,
    )
    return sorted(line.rsplit("/", 1)[-1] for line in listed.stdout.split())


def test_a_build_is_mirrored_with_its_debuginfo_metadata_and_build_ids(
    tmp_path: Path, koji: KojiStandIn, crash_fixtures: Fixtures
) -> None:
    fetcher, store, events, repo = make_fetcher(tmp_path, koji)
    done = fetcher.handle(MirrorBuildV1(build="crasher-1.0-1.fc40"))
    assert done.action == "mirrored"
    packages = repo / "fedora-40" / "x86_64" / "Packages"
    assert sorted(p.name for p in packages.iterdir()) == sorted(
        r.filename for r in crash_fixtures.rpms if r.name.startswith("crasher")
    )
    for rpm in crash_fixtures.rpms:
        if rpm.name.startswith("crasher"):
            assert (packages / rpm.filename).read_bytes() == rpm.path.read_bytes()
    assert (repo / "fedora-40" / "x86_64" / "repodata" / "repomd.xml").exists()
    crasher = next(m for m in crash_fixtures.crash.modules if m.path == "/usr/bin/crasher")
    hits = store.mirror.find_build_ids([crasher.build_id])
    assert {h.package.nevra.name for h in hits} == {"crasher", "crasher-debuginfo"}
    (event,) = events.sent
    assert event.model_dump()["build_id"] == CRASHER
    assert event.model_dump()["new_files"] == 3
    assert not list((repo / ".incoming").iterdir())


def test_the_same_build_twice_adds_nothing(tmp_path: Path, koji: KojiStandIn) -> None:
    fetcher, store, _events, repo = make_fetcher(tmp_path, koji)
    fetcher.handle(MirrorBuildV1(build=CRASHER))
    before = (repo_files(repo), len(store.mirror.all_packages()))
    downloads = len(koji.downloads)
    again = fetcher.handle(MirrorBuildV1(build=CRASHER))
    assert again.event is not None
    assert again.event.new_files == 0
    assert (repo_files(repo), len(store.mirror.all_packages())) == before
    assert len(koji.downloads) == downloads


def test_dnf_installs_from_the_mirrored_repository(tmp_path: Path, koji: KojiStandIn) -> None:
    fetcher, _store, _events, repo = make_fetcher(tmp_path, koji)
    for build in (FILESYSTEM, GLIBC, CRASHER, NOARCH, ARCHIVED):
        fetcher.handle(MirrorBuildV1(build=build))
    root = tmp_path / "root"
    dnf = [
        "dnf",
        "-y",
        "--quiet",
        f"--installroot={root}",
        "--releasever=40",
        "--forcearch=x86_64",
        "--disablerepo=*",
        f"--repofrompath=mirror,file://{repo}/fedora-40/x86_64",
        "--enablerepo=mirror",
        "--nogpgcheck",
    ]
    # The fixture's glibc is Debian's libc repackaged and lacks some of Fedora's
    # provides (rtld(GNU_HASH)), so crasher itself cannot be resolved by dnf: install
    # what has no such needs, and find the rest where dnf's metadata says they are.
    installed = run(
        [*dnf, "--setopt=tsflags=nodocs,noscripts", "install", "noarchy-part2", "oldie"],
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr + installed.stdout
    assert (root / "usr/share/noarchy/part2.bin").exists()
    assert (root / "usr/share/oldie/part0.bin").exists()
    assert repoquery(
        repo / "fedora-40" / "x86_64", "crasher", "crasher-debuginfo", "glibc-debuginfo"
    ) == [
        "crasher-1.0-1.fc40.x86_64.rpm",
        "crasher-debuginfo-1.0-1.fc40.x86_64.rpm",
        next(p.name for p in repo.rglob("glibc-debuginfo-*.rpm")),
    ]


def test_noarch_packages_are_stored_once_and_linked_per_arch(
    tmp_path: Path, koji: KojiStandIn
) -> None:
    fetcher, store, _events, repo = make_fetcher(tmp_path, koji, arches=("x86_64", "aarch64"))
    fetcher.handle(MirrorBuildV1(build=NOARCH))
    name = "noarchy-1.0-1.fc40.noarch.rpm"
    stored = repo / "fedora-40" / "noarch" / "Packages" / name
    for arch in ("x86_64", "aarch64"):
        linked = repo / "fedora-40" / arch / "Packages" / name
        assert linked.samefile(stored)
        assert (repo / "fedora-40" / arch / "repodata" / "repomd.xml").exists()
    assert stored.stat().st_nlink == 3
    assert len(store.mirror.all_packages()) == 3


def test_a_build_on_a_koji_volume_is_fetched_from_that_volume(
    tmp_path: Path, koji: KojiStandIn
) -> None:
    fetcher, _store, _events, repo = make_fetcher(tmp_path, koji)
    fetcher.handle(MirrorBuildV1(build=ARCHIVED))
    assert (repo / "fedora-40/x86_64/Packages/oldie-1.0-1.fc40.x86_64.rpm").exists()


def test_a_non_rpm_build_is_skipped_with_a_reason(
    tmp_path: Path, koji: KojiStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    fetcher, store, events, repo = make_fetcher(tmp_path, koji)
    with caplog.at_level(logging.INFO):
        done = fetcher.handle(MirrorBuildV1(build=IMAGE))
    assert done.action == "skipped"
    assert "not an RPM build (types: image)" in caplog.text
    assert events.sent == []
    assert repo_files(repo) == []
    known = store.mirror.get_build(IMAGE)
    assert known is not None
    assert known.state == "skipped"


def test_a_failed_build_is_not_mirrored(tmp_path: Path, koji: KojiStandIn) -> None:
    fetcher, _store, events, repo = make_fetcher(tmp_path, koji)
    done = fetcher.handle(MirrorBuildV1(build=FAILED))
    assert done.action == "skipped"
    assert done.reason == "its state is FAILED, not COMPLETE"
    assert events.sent == []
    assert repo_files(repo) == []


def test_an_unknown_build_can_never_succeed(tmp_path: Path, koji: KojiStandIn) -> None:
    fetcher, _store, _events, _repo = make_fetcher(tmp_path, koji)
    with pytest.raises(UnknownBuild, match="no build 999999"):
        fetcher.handle(MirrorBuildV1(build=999999))


def assert_nothing_placed(repo: Path, store: Data, name: str) -> None:
    assert not any(p.name == name for p in repo.rglob("*.rpm"))
    assert not list((repo / ".incoming").iterdir())
    assert name.removesuffix(".rpm") not in {str(p.nevra) for p in store.mirror.all_packages()}


def test_one_flipped_byte_is_a_bad_download_never_placed_and_fetched_again(
    tmp_path: Path, koji: KojiStandIn
) -> None:
    fetcher, store, _events, repo = make_fetcher(tmp_path, koji)
    name = "noarchy-part1-1.0-1.fc40.noarch.rpm"
    koji.corrupt[name] = 1
    with pytest.raises(BadDownload, match=r"payload hash .* not placed"):
        fetcher.handle(MirrorBuildV1(build=NOARCH))
    assert_nothing_placed(repo, store, name)
    # The next attempt (the worker's, after a retry delay) fetches it again.
    assert fetcher.handle(MirrorBuildV1(build=NOARCH)).action == "mirrored"
    stored = repo / "fedora-40" / "noarch" / "Packages" / name
    assert stored.read_bytes() == next(koji.files.rglob(name)).read_bytes()


def test_an_error_page_answered_with_200_is_a_bad_download(
    tmp_path: Path, koji: KojiStandIn
) -> None:
    fetcher, store, _events, repo = make_fetcher(tmp_path, koji)
    name = "noarchy-part2-1.0-1.fc40.noarch.rpm"
    koji.html[name] = 1
    try:
        with pytest.raises(BadDownload, match=r"is not an RPM \(text/html\): no RPM lead"):
            fetcher.handle(MirrorBuildV1(build=NOARCH))
    finally:
        koji.html.clear()
    assert_nothing_placed(repo, store, name)


def test_a_download_cut_short_is_a_bad_download(tmp_path: Path, koji: KojiStandIn) -> None:
    fetcher, store, _events, repo = make_fetcher(tmp_path, koji)
    name = "noarchy-1.0-1.fc40.noarch.rpm"
    koji.truncate[name] = 1
    try:
        with pytest.raises(BadDownload, match="was cut short"):
            fetcher.handle(MirrorBuildV1(build=NOARCH))
    finally:
        koji.truncate.clear()
    assert_nothing_placed(repo, store, name)


def test_koji_down_is_a_retryable_failure(tmp_path: Path, koji: KojiStandIn) -> None:
    fetcher, _store, _events, repo = make_fetcher(tmp_path, koji)
    koji.down = True
    try:
        with pytest.raises(KojiUnavailable):
            fetcher.handle(MirrorBuildV1(build=CRASHER))
    finally:
        koji.down = False
    assert repo_files(repo) == []


def test_a_deleted_build_is_removed_only_where_configured(
    tmp_path: Path, koji: KojiStandIn
) -> None:
    keep, store, _events, repo = make_fetcher(tmp_path, koji)
    keep.handle(MirrorBuildV1(build=NOARCH))
    assert keep.handle(MirrorBuildV1(build=NOARCH, action=MirrorAction.REMOVE)).action == "skipped"
    assert len(store.mirror.all_packages()) == 3

    drop, store, events, repo = make_fetcher(tmp_path, koji, delete_on_deleted=True)
    done = drop.handle(MirrorBuildV1(build=NOARCH, action=MirrorAction.REMOVE))
    assert done.action == "removed"
    assert store.mirror.all_packages() == []
    assert list(repo.rglob("*.rpm")) == []
    assert repoquery(repo / "fedora-40" / "x86_64", "noarchy*") == []
    assert events.sent[-1].model_dump()["action"] == "remove"


def test_signed_copies_are_preferred_when_a_key_is_configured(
    tmp_path: Path, koji: KojiStandIn
) -> None:
    root = tmp_path / "koji-signed"
    koji.add_build(108, build_rpms(root, "signedpkg", 2), sigkeys=("a15b79cc",))
    fetcher, _store, _events, repo = make_fetcher(tmp_path, koji, sigkeys=("A15B79CC",))
    fetcher.handle(MirrorBuildV1(build=108))
    assert (repo / "fedora-40/noarch/Packages/signedpkg-1.0-1.fc40.noarch.rpm").exists()
    assert "multiCall" in koji.calls  # the signatures of all RPMs in one round trip
    signed = "/kojifiles/packages/signedpkg/1.0/1.fc40/data/signed/a15b79cc/noarch/"
    assert f"{signed}signedpkg-1.0-1.fc40.noarch.rpm" in koji.paths


def test_retention_keeps_everything_by_default_and_applies_eol_and_size_cap(
    tmp_path: Path, koji: KojiStandIn
) -> None:
    fetcher, store, _events, repo = make_fetcher(tmp_path, koji)
    for build in (NOARCH, ARCHIVED):
        fetcher.handle(MirrorBuildV1(build=build))
    assert prune(store.mirror, repo, MirrorSettings()).packages == 0
    assert len(store.mirror.all_packages()) == 5

    # A cap just under the total drops the oldest import first (a noarch one, with its links).
    total = sum(p.size for p in store.mirror.all_packages())
    oldest = store.mirror.all_packages()[0]
    capped = MirrorSettings(max_size_gib=(total - 1) / (1 << 30))
    assert prune(store.mirror, repo, capped).packages == 1
    assert oldest.id not in {p.id for p in store.mirror.all_packages()}
    assert not list(repo.rglob(Path(oldest.path).name))

    assert prune(store.mirror, repo, MirrorSettings(eol_releases=("fedora-40",))).packages == 4
    assert store.mirror.all_packages() == []
    assert not (repo / "fedora-40").exists()


def test_a_configured_koji_tag_names_the_release(tmp_path: Path, koji: KojiStandIn) -> None:
    koji.add_build(110, build_rpms(tmp_path / "epel", "epelpkg", 1, dist=".el9"), tags=("epel9",))
    fetcher, store, _events, repo = make_fetcher(tmp_path, koji, tag_releases={"epel9": "epel-9"})
    assert fetcher.handle(MirrorBuildV1(build=110)).action == "mirrored"
    assert (repo / "epel-9/noarch/Packages/epelpkg-1.0-1.el9.noarch.rpm").exists()
    assert [p.os_release for p in store.mirror.all_packages()] == ["epel-9"]
    # Without the map there is no dist tag to go by: skipped, with the reason.
    plain, _store, _events, _repo = make_fetcher(tmp_path / "plain", koji)
    done = plain.handle(MirrorBuildV1(build=110))
    assert done.action == "skipped"
    assert "no dist tag" in (done.reason or "")


def test_signatures_are_checked_against_the_configured_keys(
    tmp_path: Path, koji: KojiStandIn
) -> None:
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(gnupg)}
    uid = "Retrace Test <retrace-test@example.org>"
    run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "rsa2048", "sign", "never"],
        env=env,
        timeout=120,
    )
    public = tmp_path / "key.asc"
    public.write_text(run(["gpg", "--armor", "--export", uid], env=env, timeout=60).stdout)
    fingerprint = run(["gpg", "--with-colons", "--list-keys", uid], env=env, timeout=60).stdout
    keyid = next(x for x in fingerprint.splitlines() if x.startswith("pub")).split(":")[4]
    sigkey = keyid[-8:].lower()
    rpms = build_rpms(tmp_path / "build", "signedreally", 2)
    signed_dir = tmp_path / "signed"
    signed_dir.mkdir()
    signed = []
    for rpm in rpms:
        copy = signed_dir / rpm.name
        copy.write_bytes(rpm.read_bytes())
        run(
            [
                "rpmsign",
                "--define",
                f"_gpg_name {uid}",
                "--define",
                f"_gpg_path {gnupg}",
                "--define",
                "__gpg /usr/bin/gpg",
                "--addsign",
                str(copy),
            ],
            env=env,
            timeout=120,
        )
        signed.append(copy)
    koji.add_build(111, rpms, signed={sigkey: signed[:1]})

    # Only the first RPM has a signed copy: the build cannot be mirrored yet.
    strict, _store, _events, repo = make_fetcher(
        tmp_path / "strict", koji, gpg_keys=(public,), sigkeys=(sigkey,)
    )
    with pytest.raises(NotSignedYet, match="not signed with a configured key"):
        strict.handle(MirrorBuildV1(build=111))
    assert not list(repo.rglob("signedreally-part1*.rpm"))

    # Once Koji has signed every RPM, the signed copies are mirrored, checked by payload hash
    # (a signed copy's size is not the one Koji records) and by signature.
    koji.add_build(111, rpms, signed={sigkey: signed})
    strict.handle(MirrorBuildV1(build=111))
    for copy in signed:
        assert (repo / "fedora-40/noarch/Packages" / copy.name).read_bytes() == copy.read_bytes()


def test_an_unreachable_koji_is_a_retryable_failure(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    hub = KojiHub(f"http://127.0.0.1:{port}/kojihub", f"http://127.0.0.1:{port}/kojifiles")
    with pytest.raises(KojiUnavailable, match="unreachable"):
        hub.build(CRASHER)


def test_the_stand_in_speaks_koji_to_the_real_client(koji: KojiStandIn) -> None:
    import koji as koji_lib

    session = koji_lib.ClientSession(koji.hub_url, {"anon_retry": False, "max_retries": 0})
    # Keyword arguments travel as koji encodes them (__starstar) and come back decoded.
    assert [r["arch"] for r in session.listRPMs(buildID=CRASHER, arches="x86_64")] == ["x86_64"] * 3
    with pytest.raises(koji_lib.GenericError, match="No such build"):
        session.getBuild(999999, strict=True)
    with pytest.raises(koji_lib.GenericError, match="Invalid method"):
        session.noSuchMethod()
    with pytest.raises(koji_lib.ParameterError):
        session.getBuild()
    with session.multicall() as m:
        found = m.getBuild(CRASHER)
        missing = m.getBuild(999999, strict=True)
    assert found.result["nvr"] == "crasher-1.0-1.fc40"
    with pytest.raises(koji_lib.GenericError, match="No such build"):
        _ = missing.result
