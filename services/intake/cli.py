"""``retrace-intake``: run the public HTTP service."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from services.common import architecture
from services.common.bus import Publisher, policy_problem
from services.common.data.db import Database
from services.common.data.intake import IntakeData
from services.common.data.schema import SchemaMismatch
from services.common.logs import setup_logging
from services.common.settings import ConfigError, IntakeConfig, load_settings
from services.common.spool import Spool
from services.intake.cleanup import Cleanup

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retrace-intake`` command."""
    parser = argparse.ArgumentParser(prog="retrace-intake", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API under gunicorn")
    serve.add_argument("--bind", help="address:port to listen on (default 127.0.0.1:8080)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (default 2)")
    serve.add_argument(
        "--config",
        help="a gunicorn config file (default: the built-in one; see deploy/gunicorn.conf.py)",
    )
    sub.add_parser(
        "cleanup",
        help="delete expired tasks, queue or remove stuck submissions, remove leftovers",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        # Fail here, with a clear message, rather than in every gunicorn worker.
        settings = load_settings(IntakeConfig)
        db = Database.from_url(settings.store_url)
        architecture.INTAKE.check_schema(db)
    except (ConfigError, SchemaMismatch) as exc:
        print(f"retrace-intake: {exc}", file=sys.stderr)
        return 2
    if args.command == "cleanup":
        publisher = Publisher(
            settings.broker.url, settings.broker.heartbeat, architecture.INTAKE.bus
        )
        try:
            report = Cleanup(
                settings.intake, IntakeData(db), Spool(settings.spool), publisher.publish
            ).run()
        finally:
            publisher.close()
        print(f"retrace-intake cleanup: {report.summary()}")
        return 0
    # Once, here, before gunicorn forks its workers: the intake publishes the commands
    # whose dead-lettering the policy decides.
    problem = policy_problem(settings.broker.management_url, settings.broker.url)
    if problem:
        log.warning("%s", problem)
    config = args.config or "python:services.intake.gunicorn_conf"
    gunicorn_argv = ["gunicorn", "-c", config]
    if args.bind:
        gunicorn_argv += ["--bind", args.bind]
    if args.workers:
        gunicorn_argv += ["--workers", str(args.workers)]
    gunicorn_argv.append("services.intake.wsgi:application")
    return os.execv(sys.executable, [sys.executable, "-m", *gunicorn_argv])  # noqa: S606 -- no shell, by design
