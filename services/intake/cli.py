"""``retrace-intake``: run the public HTTP service."""

from __future__ import annotations

import argparse
import os
import sys

from services.common.logs import setup_logging
from services.common.settings import ConfigError, load_settings
from services.common.store import SchemaMismatch, Store


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retrace-intake`` command."""
    parser = argparse.ArgumentParser(prog="retrace-intake", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API under gunicorn")
    serve.add_argument("--bind", help="address:port to listen on (default 127.0.0.1:8080)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (default 2)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        # Fail here, with a clear message, rather than in every gunicorn worker.
        settings = load_settings()
        Store.from_url(settings.store_url).check_revision()
    except (ConfigError, SchemaMismatch) as exc:
        print(f"retrace-intake: {exc}", file=sys.stderr)
        return 2
    gunicorn_argv = ["gunicorn", "-c", "python:services.intake.gunicorn_conf"]
    if args.bind:
        gunicorn_argv += ["--bind", args.bind]
    if args.workers:
        gunicorn_argv += ["--workers", str(args.workers)]
    gunicorn_argv.append("services.intake.wsgi:application")
    return os.execv(sys.executable, [sys.executable, "-m", *gunicorn_argv])  # noqa: S606 -- no shell, by design
