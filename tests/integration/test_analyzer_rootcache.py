"""The cache of unpacked RPMs, on the fixture's real RPMs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.analyzer import rootcache
from services.analyzer.rootcache import RootCache, UnpackedPackage
from services.analyzer.unpack import PayloadError
from services.common.data.mirror import Nevra, Package
from tests.fixtures.build import Fixtures, RpmPackage

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]


def package(number: int, rpm: RpmPackage) -> Package:
    return Package(
        id=number,
        nevra=Nevra(rpm.name, rpm.epoch or 0, rpm.version, rpm.release, rpm.arch),
        os_release="fedora-40",
        path=rpm.filename,
        sha256=hashlib.sha256(rpm.path.read_bytes()).hexdigest(),
        size=rpm.path.stat().st_size,
    )


@pytest.fixture
def packages(crash_fixtures: Fixtures) -> dict[str, Package]:
    return {rpm.name: package(n, rpm) for n, rpm in enumerate(crash_fixtures.rpms, start=1)}


def test_two_tasks_needing_one_rpm_at_once_unpack_it_once(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    caches = [RootCache(tmp_path / "cache", crash_fixtures.rpms_dir) for _ in range(4)]
    fresh: list[bool] = []

    def unpack(cache: RootCache) -> None:
        fresh.append(cache.unpacked(packages["glibc-debuginfo"])[1])

    threads = [threading.Thread(target=unpack, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(fresh) == [False, False, False, True]


UNPACK_IN_ANOTHER_PROCESS = """
import json, sys
from pathlib import Path
from services.analyzer.rootcache import RootCache
from services.common.data.mirror import Nevra, Package
cache_dir, repo, fields = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
fields["nevra"] = Nevra(**fields["nevra"])
print(RootCache(Path(cache_dir), Path(repo)).unpacked(Package(**fields))[1])
"""


def test_two_processes_needing_one_rpm_at_once_unpack_it_once(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    wanted = packages["glibc-debuginfo"]
    fields = json.dumps(dataclasses.asdict(wanted))
    cache = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
    argv = [sys.executable, "-c", UNPACK_IN_ANOTHER_PROCESS]
    argv += [str(tmp_path / "cache"), str(crash_fixtures.rpms_dir), fields]
    # Both start while this process holds the entry's lock, so both must wait for it.
    with cache._locks.held([f"unpack {wanted.sha256}"]):
        workers = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=PROJECT) for _ in range(2)
        ]
        time.sleep(1.5)
        assert all(worker.poll() is None for worker in workers)  # waiting, not done
    answers = sorted(worker.communicate(timeout=60)[0].strip() for worker in workers)
    assert answers == ["False", "True"]


def test_a_root_seen_before_is_assembled_without_unpacking(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    cache = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
    wanted = [packages[name] for name in ("filesystem", "glibc", "crasher")]
    cache.assemble(wanted, tmp_path / "first")
    cache.assemble(wanted, tmp_path / "second")
    assert all(not cache.unpacked(p)[1] for p in wanted)
    # The same package set is served by the same kept, read-only tree.
    assert (tmp_path / "first").resolve() == (tmp_path / "second").resolve()
    assert (tmp_path / "second/usr/lib64/libc.so.6").stat().st_nlink == 2
    assert (tmp_path / "second/lib64/ld-linux-x86-64.so.2").is_file()
    # Another set is another tree, built from the same unpacked packages.
    cache.assemble(wanted[:2], tmp_path / "third")
    assert (tmp_path / "third").resolve() != (tmp_path / "first").resolve()
    assert (tmp_path / "third/usr/lib64/libc.so.6").stat().st_nlink == 3


def test_the_bound_evicts_least_recently_used_entries_no_task_holds(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    unbounded = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
    order = ["crasher", "glibc", "crasher-debuginfo", "glibc-debuginfo", "filesystem"]
    for name in order:
        unbounded.unpacked(packages[name])
        time.sleep(0.01)  # distinct use times
    full = unbounded.size()
    glibc_debuginfo = unbounded.unpacked(packages["glibc-debuginfo"])[0]
    bound = full - 1  # one entry must go
    cache = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir, max_bytes=bound)
    with cache.lease([packages["crasher"]]):
        removed = cache.evict()
    # The oldest entry (crasher) is in use, so the next oldest goes instead.
    assert removed == [packages["glibc"].sha256]
    assert cache.size() <= bound
    assert glibc_debuginfo.folder.is_dir()
    assert cache.unpacked(packages["crasher"])[1] is False
    assert cache.unpacked(packages["glibc"])[1] is True


def test_an_evicted_package_takes_the_kept_roots_built_on_it_along(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    cache = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
    cache.assemble([packages["filesystem"], packages["glibc"]], tmp_path / "root")
    kept = (tmp_path / "root").resolve()
    bounded = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir, max_bytes=1)
    assert sorted(bounded.evict()) == sorted(
        [packages["filesystem"].sha256, packages["glibc"].sha256]
    )
    assert not kept.exists()


def test_an_rpm_that_is_not_what_the_mirror_recorded_is_refused_and_not_cached(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    glibc = packages["glibc"]
    body = bytearray((crash_fixtures.rpms_dir / glibc.path).read_bytes())
    # One byte of the signature header's data (a digest rpm would check): unpacking
    # never reads it, so only the file's own sha256 can tell.
    tags = int.from_bytes(body[104:108], "big")
    body[112 + 16 * tags] ^= 0xFF
    (repo / glibc.path).write_bytes(bytes(body))
    cache = RootCache(tmp_path / "cache", repo)
    with pytest.raises(PayloadError, match=f"{glibc.path} is not the file the mirror recorded"):
        cache.unpacked(glibc)
    assert list((tmp_path / "cache/entries").iterdir()) == []
    with pytest.raises(PayloadError):
        cache.assemble([glibc], tmp_path / "root")
    assert not (tmp_path / "root").exists()
    assert [p.name for p in (tmp_path / "cache/trees").iterdir()] == []


def test_a_damaged_cache_entry_is_unpacked_again(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    cache = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
    crasher = packages["crasher"]
    first, fresh = cache.unpacked(crasher)
    assert fresh
    (first.folder / "manifest").write_text("{not json\n")
    again, fresh = cache.unpacked(crasher)
    assert fresh
    assert again.find("/usr/bin/crasher") is not None
    assert again.entries == first.entries


def test_what_a_killed_analyzer_left_is_swept_when_the_next_one_starts(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    RootCache(tmp_path / "cache", repo)
    packages, roots = tmp_path / "cache/entries", tmp_path / "cache/trees"
    left = [packages / ".evicted-abc", packages / ".unpack-old", roots / ".root-old"]
    young = [packages / ".unpack-now", roots / ".root-now", packages / "abc"]
    for folder in left + young:
        folder.mkdir()
        (folder / "file").write_text("x")
    day_ago = time.time() - 86400
    for folder in left[1:]:
        os.utime(folder, (day_ago, day_ago))
    RootCache(tmp_path / "cache", repo)
    assert [f for f in left if f.exists()] == []
    assert all(f.exists() for f in young)  # perhaps another analyzer's work in progress


ODD_DEBUG = "/usr/lib/debug/usr/bin/odd-{}-1.0-1.fc40.x86_64.debug"


def read_again(*_args: object) -> int:
    raise AssertionError("the RPM was read a second time")


def data(files: UnpackedPackage, path: str) -> bytes:
    found = files.find(path)
    assert found is not None, path
    return found.read_bytes()


def test_a_root_takes_only_the_debug_files_it_names_and_a_later_one_gets_others(
    tmp_path: Path,
    crash_fixtures: Fixtures,
    packages: dict[str, Package],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
    debuginfo = packages["oddities-debuginfo"]
    abort, thread = ODD_DEBUG.format("abort"), ODD_DEBUG.format("thread")
    whole = RootCache(tmp_path / "whole", crash_fixtures.rpms_dir).unpacked(debuginfo)[0]

    first = tmp_path / "first"
    with monkeypatch.context() as once:
        # A cold partial unpack reads the RPM once: it needs no second reading.
        once.setattr(rootcache, "fill_rpm", read_again)
        cache.assemble([debuginfo], first, {debuginfo.sha256: frozenset({abort})})
    assert (first / abort.lstrip("/")).read_bytes() == data(whole, abort)
    assert not (first / thread.lstrip("/")).exists()
    # Of the package's paths, the root has that file and the folders above it alone.
    assert sorted(str(p.relative_to(first)) for p in first.rglob("*")) == [
        "usr",
        "usr/lib",
        "usr/lib/debug",
        "usr/lib/debug/usr",
        "usr/lib/debug/usr/bin",
        abort.lstrip("/"),
    ]
    entry = cache.unpacked(debuginfo, frozenset({abort}))
    assert entry[1] is False  # nothing more to write
    assert entry[0].find(thread) is None
    assert cache.size() < whole.size

    # A later crash needs another file of the package: it is written into the same
    # entry, and the first root, kept, is not served to it.
    second = tmp_path / "second"
    cache.assemble([debuginfo], second, {debuginfo.sha256: frozenset({thread})})
    assert second.resolve() != first.resolve()
    assert (second / thread.lstrip("/")).read_bytes() == data(whole, thread)
    assert not (second / abort.lstrip("/")).exists()
    assert (first / abort.lstrip("/")).is_file()
    # Another process (a new cache object) sees both, and a root asked for again is
    # the one kept.
    again = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
    assert again.unpacked(debuginfo, frozenset({abort, thread}))[1] is False
    third = tmp_path / "third"
    again.assemble([debuginfo], third, {debuginfo.sha256: frozenset({abort})})
    assert third.resolve() == first.resolve()
    # Asked whole, the rest is written: the entry then equals a whole unpacking.
    complete, fresh = again.unpacked(debuginfo)
    assert fresh
    assert not complete.absent
    assert complete.size == whole.size == again.size()
    assert complete.entries == whole.entries


def test_paths_asked_for_through_build_id_links_are_followed(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    cache = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
    debuginfo = packages["crasher-debuginfo"]
    links = [
        e.path
        for e in cache.unpacked(debuginfo, frozenset())[0].entries
        if e.path.endswith(".debug") and "/.build-id/" in e.path
    ]
    assert len(links) == 2
    root = tmp_path / "root"
    cache.assemble([debuginfo], root, {debuginfo.sha256: frozenset({f"/{links[0]}"})})
    taken = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(taken) == 1
    assert (root / links[0]).resolve() == taken[0].resolve()  # the link leads to it
    # The other file's link is not made: it would lead nowhere.
    assert not (root / links[1]).is_symlink()


def test_two_threads_asking_for_different_files_of_one_entry_get_both(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    debuginfo = packages["oddities-debuginfo"]
    names = ["abort", "thread", "throw", "recurse"]
    RootCache(tmp_path / "cache", crash_fixtures.rpms_dir).unpacked(debuginfo, frozenset())
    found: dict[str, bool] = {}

    def fill(name: str) -> None:
        cache = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
        files = cache.unpacked(debuginfo, frozenset({ODD_DEBUG.format(name)}))[0]
        found[name] = files.find(ODD_DEBUG.format(name)) is not None

    threads = [threading.Thread(target=fill, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == dict.fromkeys(names, True)
    last = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir).unpacked(
        debuginfo, frozenset(ODD_DEBUG.format(n) for n in names)
    )
    assert last[1] is False


def test_a_task_that_ends_leaves_no_unpacking_of_its_own_behind(
    tmp_path: Path, crash_fixtures: Fixtures, packages: dict[str, Package]
) -> None:
    cache = RootCache(tmp_path / "cache", crash_fixtures.rpms_dir)
    wanted = list(packages.values())  # far more jobs than the pool has threads
    pending = cache.prefetch(wanted, {})
    RootCache.settle(pending.values())
    assert all(future.done() for future in pending.values())
    assert any(future.cancelled() for future in pending.values())
    # What was started was finished whole; nothing is left half written.
    assert not [p for p in (tmp_path / "cache/entries").iterdir() if p.name.startswith(".")]
    for package in wanted:
        entry = tmp_path / "cache/entries" / package.sha256
        assert not entry.exists() or (entry / "manifest").is_file()
