"""Mirror benchmarks: ingest throughput against a plain download, and build-id lookups.

Run ``bench/mirror`` from the project root.  Prints:

* ingest: one Koji build of N RPMs (the stand-in of tests/integration/koji_hub.py
  on 127.0.0.1) mirrored by the real fetcher -- download, payload-hash check,
  placement, header read and build-id indexing, createrepo_c -- against ``curl``
  plus ``rpmkeys --checksig`` of the same files from the same server; the ratio
  of the two throughputs (target >= 0.5);
* lookup: the time of one build-id lookup in an index of 1 million rows (SQLite;
  target <= 1 ms).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from schemas.messages import MirrorBuildV1
from services.common.settings import MirrorSettings
from services.common.store import Store, build_ids, packages
from services.mirror.fetcher import Fetcher
from services.mirror.koji import KojiHub
from tests.integration.koji_hub import KojiStandIn, build_rpms


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

        store = Store.from_url(f"sqlite:///{work}/retrace.sqlite3")
        store.migrate()
        fetcher = Fetcher(
            store,
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


def lookup(work: Path, rows: int, queries: int) -> None:
    store = Store.from_url(f"sqlite:///{work}/index.sqlite3")
    store.migrate()
    rng = random.Random(5)
    per_package = 10
    now = datetime.now(UTC)
    started = time.perf_counter()
    with store.engine.begin() as conn:
        conn.execute(
            packages.insert(),
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
        )
        ids = [f"{rng.getrandbits(160):040x}" for _ in range(rows)]
        batch = 50_000
        for start in range(0, rows, batch):
            conn.execute(
                build_ids.insert(),
                [
                    {
                        "build_id": ids[i],
                        "package_id": i // per_package + 1,
                        "kind": "binary",
                        "path": f"/usr/lib64/lib{i}.so",
                    }
                    for i in range(start, min(rows, start + batch))
                ],
            )
    filled = time.perf_counter() - started
    wanted = rng.sample(ids, queries)
    times = []
    for build_id in wanted:
        t = time.perf_counter()
        hits = store.find_build_ids([build_id])
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
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mirror-") as tmp:
        ingest(Path(tmp) / "ingest", args.rpms, args.size_kib)
        lookup(Path(tmp), args.rows, args.queries)


if __name__ == "__main__":
    main()
