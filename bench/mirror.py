"""Mirror benchmarks: ingest throughput, indexing cost per RPM, and build-id lookups.

Run ``bench/mirror`` from the project root (about two minutes).  Prints:

* ingest: one Koji build of N RPMs (the stand-in of tests/integration/koji_hub.py
  on 127.0.0.1) mirrored by the real fetcher -- download, payload-hash check,
  placement, header read and build-id indexing, createrepo_c -- against ``curl``
  plus ``rpmkeys --checksig`` of the same files from the same server; the ratio
  of the two throughputs (target >= 0.5);
* indexing: the cost per RPM of ``index_rpm`` (the header, the whole payload and the
  build-id note of every ELF file in it), over a repository of the fixture RPMs copied
  ``--copies`` times under distinct names, as a ratio to ``rpm -qp --queryformat
  '%{NAME}'`` of each file (the header alone, a process per RPM, what the import did
  before) and to elfutils' ``debuginfod -R`` scanning the same repository once (fresh
  database; from its start until its ``/metrics`` show every RPM scanned and no scan
  work pending or running), each the median of ``--index-runs`` runs taken in turns;
  with ``--big``, the same for one large RPM alone (bench/readers' ~200 MiB of shared
  libraries, built once and kept under ``.cache/bench/``);
* lookup: the time of one build-id lookup in an index of 1 million rows (SQLite;
  target <= 1 ms).
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# bench/readers.py: this script's folder is first on sys.path.
from readers import big_rpm

from schemas.messages import MirrorBuildV1
from services.common.data import schema
from services.common.data.db import Database
from services.common.data.mirror import MirrorData
from services.common.settings import MirrorSettings
from services.mirror.fetcher import Fetcher
from services.mirror.index import index_rpm
from services.mirror.koji import KojiHub
from tests.fixtures.build import build_fixtures
from tests.integration.koji_hub import KojiStandIn, build_rpms

SCANNED = 'scanned_files_total{source=".rpm archive"}'
SCAN_PENDING = 'thread_work_pending{role="scan"}'
SCAN_BUSY = 'thread_busy{role="scan"}'
SCAN_THREADS = 'thread_count{role="scan"}'


def ingest(work: Path, count: int, size_kib: int) -> None:
    rpms = build_rpms(work / "rpms", "benchpkg", count, size_kib=size_kib, arch="x86_64")
    total = sum(p.stat().st_size for p in rpms)
    koji = KojiStandIn(work / "koji").start()
    try:
        build = koji.add_build(1, rpms)
        urls = [
            f"{koji.top_url}/packages/{build.name}/{build.version}/{build.release}/x86_64/{p.name}"
            for p in rpms
        ]
        # Baseline: what a careful person does by hand.
        plain = work / "plain"
        plain.mkdir()
        started = time.perf_counter()
        for url in urls:
            target = plain / url.rsplit("/", 1)[1]
            subprocess.run(["curl", "-sSf", "-o", str(target), url], check=True)
            subprocess.run(["rpmkeys", "--checksig", str(target)], check=True, capture_output=True)
        baseline = time.perf_counter() - started

        db = Database.from_url(f"sqlite:///{work}/retrace.sqlite3")
        schema.migrate(db, [schema.MIRROR])
        fetcher = Fetcher(
            MirrorData(db),
            work / "repo",
            MirrorSettings(),
            KojiHub(koji.hub_url, koji.top_url),
            lambda *_: None,
        )
        started = time.perf_counter()
        done = fetcher.handle(MirrorBuildV1(build=1))
        ours = time.perf_counter() - started
        assert done.event is not None, done
        assert done.event.new_files == count, done
    finally:
        koji.stop()
    mib = total / (1 << 20)
    print(f"ingest: one build of {count} RPMs, {mib:.1f} MiB")
    print(f"  curl + rpmkeys --checksig: {baseline:.2f} s ({mib / baseline:.1f} MiB/s)")
    print(
        f"  retrace-mirror worker (download, verify, place, index, createrepo_c): "
        f"{ours:.2f} s ({mib / ours:.1f} MiB/s)"
    )
    print(f"  throughput ratio (target >= 0.5): {baseline / ours:.2f}")


def index_all(rpms: list[Path]) -> None:
    entries = sum(len(index_rpm(rpm).entries) for rpm in rpms)
    assert entries > 0


def rpm_query_all(rpms: list[Path]) -> None:
    for rpm in rpms:
        subprocess.run(
            ["rpm", "-qp", "--queryformat", "%{NAME}", str(rpm)], check=True, capture_output=True
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def metrics(port: int) -> dict[str, float]:
    """debuginfod's ``/metrics`` as ``{'name{labels}': value}``; empty while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return {}
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


class PortTaken(Exception):
    """debuginfod could not listen on the port it was given (another process took it)."""


def debuginfod_scan(repo: Path, count: int, work: Path) -> tuple[float, int]:
    """Seconds from debuginfod's start until it has scanned all ``count`` RPMs; its scan threads.

    ``thread_work_pending`` is 0 before the first traversal queues anything, so the
    RPMs scanned must also have reached ``count``, and no scan thread may be busy.
    With ``count`` 0 (an empty folder) this is its start-up: until ``/metrics`` answer.
    A port another process takes between our choice and debuginfod's start is retried.
    """
    for attempt in range(5):
        try:
            return _debuginfod_scan(repo, count, work / f"attempt-{attempt}")
        except PortTaken:
            continue
    raise SystemExit("debuginfod found every port it was given taken (five tries)")


def _debuginfod_scan(repo: Path, count: int, work: Path) -> tuple[float, int]:
    work.mkdir(parents=True)
    port = free_port()
    log = work / "debuginfod.log"
    with log.open("wb") as err:
        started = time.perf_counter()
        daemon = subprocess.Popen(
            ["debuginfod", "-R", str(repo), "-p", str(port), "-d", str(work / "db.sqlite")],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            while True:
                if daemon.poll() is not None:
                    said = log.read_text()
                    if "cannot start http server" in said:
                        raise PortTaken(port)
                    raise SystemExit(f"debuginfod exited with {daemon.returncode}:\n{said}")
                if time.perf_counter() - started > 600:
                    raise SystemExit(f"debuginfod did not finish its scan in 600 s (see {log})")
                seen = metrics(port)
                if (
                    seen.get("ready") == 1  # debuginfod's own metrics answer
                    and seen.get(SCANNED, 0) >= count
                    and seen.get(SCAN_PENDING, 0) == 0
                    and seen.get(SCAN_BUSY, 0) == 0
                ):
                    return time.perf_counter() - started, int(seen.get(SCAN_THREADS, 0))
                time.sleep(0.01)
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def indexing(work: Path, label: str, rpms: list[Path], runs: int) -> None:
    """Index cost per RPM of the repository ``rpms``: index_rpm, rpm -qp, debuginfod -R."""
    repo = rpms[0].parent
    count = len(rpms)
    assert sorted(repo.glob("*.rpm")) == sorted(rpms)  # debuginfod scans the whole folder
    times: dict[str, list[float]] = {"index_rpm": [], "rpm -qp": [], "debuginfod": []}
    starts: list[float] = []
    threads = 0
    empty = work / f"empty-{repo.name}"
    empty.mkdir()

    def timed(name: str, run: Callable[[], None]) -> None:
        started = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - started)

    for n in range(runs):  # in turns, so that each sees the machine alike
        timed("index_rpm", lambda: index_all(rpms))
        timed("rpm -qp", lambda: rpm_query_all(rpms))
        seconds, threads = debuginfod_scan(repo, count, work / f"debuginfod-{repo.name}-{n}")
        times["debuginfod"].append(seconds)
        # Its start-up alone: an empty folder, until /metrics answer.
        starts.append(debuginfod_scan(empty, 0, work / f"debuginfod-{repo.name}-{n}-empty")[0])
    per = {name: statistics.median(seen) / count * 1000 for name, seen in times.items()}
    mib = sum(p.stat().st_size for p in rpms) / (1 << 20)

    def shown(name: str) -> str:
        return ", ".join(f"{t:.3f}" for t in times[name])

    print(f"indexing: {label}, {mib:.1f} MiB; median of {runs} runs (each run's total in s)")
    print(
        f"  index_rpm (header, whole payload, ELF build-id notes): {per['index_rpm']:.2f} ms"
        f" per RPM ({shown('index_rpm')})"
    )
    print(
        f"  rpm -qp --queryformat %{{NAME}}, a process per RPM: {per['rpm -qp']:.2f} ms"
        f" per RPM ({shown('rpm -qp')})"
    )
    print(
        f"  debuginfod -R, one scan of the repository ({threads} scan threads, start to "
        f"done): {per['debuginfod']:.2f} ms per RPM ({shown('debuginfod')}; its start-up "
        f"alone, over an empty folder: {statistics.median(starts):.3f} s)"
    )
    print(
        f"  index_rpm / rpm -qp: {per['index_rpm'] / per['rpm -qp']:.2f}; "
        f"index_rpm / debuginfod: {per['index_rpm'] / per['debuginfod']:.2f}"
    )


def fixture_repo(repo: Path, copies: int) -> tuple[str, list[Path]]:
    """The fixture RPMs copied ``copies`` times under distinct names into ``repo``."""
    fixtures = build_fixtures()
    repo.mkdir(parents=True)
    for n in range(copies):
        for rpm in fixtures.rpms:
            shutil.copyfile(rpm.path, repo / f"copy{n}-{rpm.filename}")
    rpms = sorted(repo.glob("*.rpm"))
    return f"{len(rpms)} RPMs ({len(fixtures.rpms)} fixture RPMs x {copies} copies)", rpms


def big_repo(repo: Path) -> tuple[str, list[Path]]:
    """A repository of the one large RPM bench/readers builds (once, then kept)."""
    big = big_rpm(200)
    repo.mkdir(parents=True)
    shutil.copyfile(big, repo / big.name)
    return "1 large RPM (bench/readers' ~200 MiB of shared libraries, zstd -19)", [repo / big.name]


def lookup(work: Path, rows: int, queries: int) -> None:
    db = Database.from_url(f"sqlite:///{work}/index.sqlite3")
    schema.migrate(db, [schema.MIRROR])
    index = MirrorData(db)
    rng = random.Random(5)
    per_package = 10
    now = datetime.now(UTC)
    started = time.perf_counter()
    ids = [f"{rng.getrandbits(160):040x}" for _ in range(rows)]
    index.bulk_load(
        [
            {
                "name": f"pkg{i}",
                "epoch": 0,
                "version": "1.0",
                "release": "1.fc40",
                "arch": "x86_64",
                "os_release": "fedora-40",
                "path": f"fedora-40/x86_64/Packages/pkg{i}.rpm",
                "sha256": "0" * 64,
                "size": 1,
                "added_at": now,
            }
            for i in range(rows // per_package)
        ],
        [
            {
                "build_id": ids[i],
                "package_id": i // per_package + 1,
                "kind": "binary",
                "path": f"/usr/lib64/lib{i}.so",
            }
            for i in range(rows)
        ],
    )
    filled = time.perf_counter() - started
    wanted = rng.sample(ids, queries)
    times = []
    for build_id in wanted:
        t = time.perf_counter()
        hits = index.find_build_ids([build_id])
        times.append(time.perf_counter() - t)
        assert len(hits) == 1
    times.sort()
    print(f"lookup: {rows:,} build-id rows (filled in {filled:.0f} s), {queries} lookups")
    print(
        f"  median {statistics.median(times) * 1000:.3f} ms, "
        f"p99 {times[int(len(times) * 0.99)] * 1000:.3f} ms (target <= 1 ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rpms", type=int, default=24)
    parser.add_argument("--size-kib", type=int, default=4096)
    parser.add_argument("--copies", type=int, default=8, help="copies of the fixture RPMs")
    parser.add_argument("--index-runs", type=int, default=3)
    parser.add_argument(
        "--big", action="store_true", help="index bench/readers' large RPM too (built once)"
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mirror-") as tmp:
        ingest(Path(tmp) / "ingest", args.rpms, args.size_kib)
        work = Path(tmp) / "indexing"
        label, rpms = fixture_repo(work / "fixtures", args.copies)
        indexing(work, label, rpms, args.index_runs)
        if args.big:
            label, rpms = big_repo(work / "big")
            indexing(work, label, rpms, args.index_runs)
        lookup(Path(tmp), args.rows, args.queries)


if __name__ == "__main__":
    main()
