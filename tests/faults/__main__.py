"""``make faults``: every probe, longer, and the table the README's "Reliability" shows."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from tests.faults.harness import HEADER
from tests.faults.probes import PROBES, run_probe
from tests.fixtures.build import build_fixtures

BROKER = "amqp://guest:guest@127.0.0.1:5672"


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
    chosen = [p for p in PROBES if not args.probe or any(w in p.name for w in args.probe)]
    for probe in chosen:
        vhost = f"retrace-faults-{uuid.uuid4().hex[:12]}"
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
        )
        try:
            with tempfile.TemporaryDirectory(prefix="retrace-faults-") as work:
                verdict = run_probe(
                    probe, Path(work) / "home", f"{BROKER}/{vhost}", fixtures, args.scale
                )
        finally:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False)
        print(verdict.row(), file=sys.stderr, flush=True)
        rows.append(verdict.row())
        clean = clean and verdict.clean
    print(HEADER)
    print("\n".join(rows))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
