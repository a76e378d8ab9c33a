"""``retrace-analyzer``: the gdb worker; start as many as you like."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from types import FrameType

from schemas.messages import TASK_ID_PATTERN
from schemas.topology import ANALYZE, ANALYZER_BUILD_SYNCED
from services.analyzer.deadletters import DeadLetterHandler
from services.analyzer.debugshell import ShellError, open_shell
from services.analyzer.fetch import BuildSyncedHandler
from services.analyzer.retrace import sandbox_for
from services.analyzer.rootcache import RootCache
from services.analyzer.sandbox import SandboxUnavailable
from services.analyzer.unpack import PayloadError
from services.analyzer.worker import AnalyzeHandler
from services.common import architecture
from services.common.bus import Consumer, Publisher, policy_problem
from services.common.data.analyzer import AnalyzerData
from services.common.data.db import Database
from services.common.data.intake import IntakeData
from services.common.data.mirror import MirrorData
from services.common.data.schema import SchemaMismatch
from services.common.logs import setup_logging
from services.common.runner import CommandError
from services.common.settings import AnalyzerConfig, ConfigError, load_settings, log_settings
from services.common.spool import Spool

log = logging.getLogger(__name__)

_TASK_ID = re.compile(TASK_ID_PATTERN)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retrace-analyzer`` command."""
    parser = argparse.ArgumentParser(prog="retrace-analyzer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="consume analyze commands until stopped (SIGTERM, SIGINT)")
    shell = sub.add_parser("shell", help="rebuild a debug task's root and open gdb on its core")
    shell.add_argument("task", help="the task id")
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "shell":
        return _shell(args.task)
    try:
        settings = load_settings(AnalyzerConfig)
        log_settings(settings, "retrace-analyzer")
        db = Database.from_url(settings.store_url)
        architecture.ANALYZER.check_schema(db)
        sandbox_for(settings.analyzer).check()
    except (ConfigError, SchemaMismatch, SandboxUnavailable) as exc:
        print(f"retrace-analyzer: {exc}", file=sys.stderr)
        return 2
    problem = policy_problem(settings.broker.management_url, settings.broker.url)
    if problem:
        log.warning("%s", problem)
    tasks = IntakeData(db)
    fetch_data = AnalyzerData(db, tasks)
    cache_dir = settings.resolve(settings.analyzer.cache)
    publisher = Publisher(settings.broker.url, settings.broker.heartbeat, architecture.ANALYZER.bus)
    handler = AnalyzeHandler(
        settings.analyzer,
        tasks,
        fetch_data,
        MirrorData(db),
        Spool(settings.spool),
        RootCache(cache_dir, settings.repo, settings.analyzer.cache_max_mib << 20),
        publisher.publish,
        cache_dir / "work",
        publisher.publish_later,
    )
    # One connection consumes everything this process takes: its commands, their
    # dead letters and the mirror's build-synced events; one publishes.
    consumer = Consumer(
        settings.broker.url,
        settings.broker.heartbeat,
        settings.analyzer.arches,
        architecture.ANALYZER.bus,
    )
    consumer.subscribe(ANALYZE, handler)
    consumer.subscribe_dead_letters(
        [ANALYZE.dead_letter_queue_for(arch) for arch in settings.analyzer.arches],
        DeadLetterHandler(
            tasks,
            Spool(settings.spool),
            publisher.publish,
            publisher.publish_later,
            settings.analyzer.lease_seconds,
        ),
    )
    consumer.subscribe(ANALYZER_BUILD_SYNCED, BuildSyncedHandler(fetch_data, publisher.publish))

    def stop(_signum: int, _frame: FrameType | None) -> None:
        consumer.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        consumer.run()
    finally:
        publisher.close()
    return 0


def _shell(task_id: str) -> int:
    try:
        settings = load_settings(AnalyzerConfig)
        if not _TASK_ID.match(task_id):
            raise ShellError(f"{task_id!r} is not a task id")
        cache_dir = settings.resolve(settings.analyzer.cache)
        sandbox = sandbox_for(settings.analyzer)
        sandbox.check()
        return open_shell(
            Spool(settings.spool).task_dir(task_id),
            RootCache(cache_dir, settings.repo, settings.analyzer.cache_max_mib << 20),
            sandbox,
            settings.analyzer.gdb,
            cache_dir / "work",
        )
    except (ConfigError, SandboxUnavailable, ShellError, CommandError, PayloadError) as exc:
        print(f"retrace-analyzer: {exc}", file=sys.stderr)
        return 2
