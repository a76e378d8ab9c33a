"""``retrace-mirror``: the repository of every package version, with its build-id index."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.logs import setup_logging
from services.common.rpm import RpmError
from services.common.runner import CommandError
from services.common.settings import ConfigError, load_settings, log_settings
from services.common.store import SchemaMismatch, Store
from services.mirror.importer import import_rpm


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retrace-mirror`` command."""
    parser = argparse.ArgumentParser(prog="retrace-mirror", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="add local RPM files to the repository and index")
    imp.add_argument("files", nargs="+", type=Path, metavar="FILE.rpm")
    imp.add_argument("--release", help="OS release (e.g. fedora-40) when no dist tag tells it")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = load_settings()
        log_settings(settings, "retrace-mirror")
        store = Store.from_url(settings.store_url)
        store.check_revision()
    except (ConfigError, SchemaMismatch) as exc:
        print(f"retrace-mirror: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.files:
        try:
            done = import_rpm(store, settings.repo, path, args.release)
        except (RpmError, CommandError, ValueError, OSError) as exc:
            print(f"retrace-mirror: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        state = "imported" if done.new else "already mirrored"
        print(
            f"{state}: {done.package.nevra} ({done.package.os_release}, {done.build_ids} build-ids)"
        )
    return 1 if failed else 0
