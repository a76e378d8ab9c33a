"""``make faults``: every probe, longer, and the table the README's "Reliability" shows."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.faults.harness import HEADER
from tests.faults.probes import PROBES, run_probe
from tests.fixtures.build import build_fixtures
from tests.integration.broker import Vhosts


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--scale", type=int, default=5, help="uploads and faults per probe, x")
    parser.add_argument(
        "--probe", action="append", help="run only the probes whose name contains this"
    )
    args = parser.parse_args()
    fixtures = build_fixtures()
    rows = []
    clean = True
    vhosts = Vhosts(prefix="retrace-faults")
    chosen = [p for p in PROBES if not args.probe or any(w in p.name for w in args.probe)]
    for probe in chosen:
        broker_url = vhosts.make()
        try:
            with tempfile.TemporaryDirectory(prefix="retrace-faults-") as work:
                verdict = run_probe(probe, Path(work) / "home", broker_url, fixtures, args.scale)
        finally:
            vhosts.delete()
        print(verdict.row(), file=sys.stderr, flush=True)
        rows.append(verdict.row())
        clean = clean and verdict.clean
    print(HEADER)
    print("\n".join(rows))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
