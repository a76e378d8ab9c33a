"""``retrace-mirror``: the repository of every package version, with its build-id index."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from schemas.messages import MirrorAction, MirrorBuildV1
from schemas.topology import MIRROR_BUILD
from services.common import architecture
from services.common.bus import Publisher, PublishError, policy_problem
from services.common.data.db import Database
from services.common.data.mirror import MirrorData, Package
from services.common.data.schema import SchemaMismatch
from services.common.logs import setup_logging
from services.common.rpm import RpmError
from services.common.runner import CommandError
from services.common.settings import ConfigError, MirrorConfig, load_settings, log_settings
from services.mirror.deadletters import MirrorDeadLetters
from services.mirror.fetcher import Fetcher
from services.mirror.http import serve
from services.mirror.importer import import_rpm, reindex
from services.mirror.koji import KojiError, KojiHub, KojiUnavailable
from services.mirror.listener import listen
from services.mirror.repo import update_metadata
from services.mirror.retention import prune
from services.mirror.worker import MirrorHandler, WaitQueues, clean_incoming, run_worker

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrace-mirror", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="add local RPM files to the repository and index")
    imp.add_argument("files", nargs="+", type=Path, metavar="FILE.rpm")
    imp.add_argument("--release", help="OS release (e.g. fedora-40) when no dist tag tells it")
    sub.add_parser(
        "reindex",
        help="index the ELF files of packages indexed from their header links alone "
        "(idempotent; resumes where an interrupted run stopped)",
    )
    sub.add_parser("worker", help="consume mirror commands: download, check, place, index")
    sub.add_parser("listen", help="turn Koji's build messages into mirror commands")
    sync = sub.add_parser("sync", help="ask the worker to mirror builds now (a backfill)")
    which = sync.add_mutually_exclusive_group(required=True)
    which.add_argument("--build", help="a Koji build id or NVR")
    which.add_argument(
        "--since", type=datetime.fromisoformat, help="builds completed after DATE (ISO 8601)"
    )
    which.add_argument("--tag", help="every build in a Koji tag")
    sync.add_argument(
        "--remove", action="store_true", help="remove the build instead (with --build)"
    )
    sub.add_parser("prune", help="apply the retention settings (EOL releases, size cap)")
    serve = sub.add_parser("serve", help="serve the repository over HTTP (dnf, /metrics)")
    serve.add_argument("--bind", default="127.0.0.1:8081", help="HOST:PORT to listen on")
    serve.add_argument("--workers", type=int, default=2)
    return parser


def koji_for(settings: MirrorConfig) -> KojiHub:
    """The Koji hub our settings name."""
    mirror = settings.mirror
    return KojiHub(mirror.koji_hub, mirror.koji_topurl, mirror.koji_timeout)


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 -- one return per command
    """Entry point of the ``retrace-mirror`` command."""
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        settings = load_settings(MirrorConfig)
        log_settings(settings, "retrace-mirror")
        db = Database.from_url(settings.store_url)
        architecture.MIRROR.check_schema(db)
        data = MirrorData(db)
    except (ConfigError, SchemaMismatch) as exc:
        print(f"retrace-mirror: {exc}", file=sys.stderr)
        return 2
    if args.command == "import":
        return _import(data, settings, args.files, args.release)
    if args.command == "reindex":
        return _reindex(data, settings)
    if args.command == "worker":
        warn_policy(settings)
        return _worker(data, settings)
    if args.command == "listen":
        warn_policy(settings)
        listen(settings, data, koji_for(settings))
        return 0
    if args.command == "sync":
        return _sync(settings, args)
    if args.command == "prune":
        return _prune(data, settings)
    return serve(settings, data, args.bind, args.workers)


def warn_policy(settings: MirrorConfig) -> None:
    """Log a warning when the broker lacks our command queues' dead-lettering policy."""
    problem = policy_problem(settings.broker.management_url, settings.broker.url)
    if problem:
        log.warning("%s", problem)


def _import(
    data: MirrorData, settings: MirrorConfig, files: list[Path], release: str | None
) -> int:
    failed = 0
    touched: set[Path] = set()
    for path in files:
        try:
            done = import_rpm(data, settings.repo, path, release)
        except (RpmError, CommandError, ValueError, OSError) as exc:
            print(f"retrace-mirror: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        state = "imported" if done.new else "already mirrored"
        print(
            f"{state}: {done.package.nevra} ({done.package.os_release}, {done.build_ids} build-ids)"
        )
        touched.add((settings.repo / done.package.path).parent.parent)
    try:
        # dnf and debuginfod see the new files only through the metadata.
        for folder in sorted(touched):
            update_metadata(folder, settings.mirror.createrepo_workers)
    except CommandError as exc:
        print(f"retrace-mirror: updating the repository metadata failed: {exc}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _reindex(data: MirrorData, settings: MirrorConfig) -> int:
    def report(number: int, total: int, package: Package) -> None:
        print(f"[{number}/{total}] {package.nevra} ({package.os_release})", flush=True)

    done = reindex(data, settings.repo, report)
    left = data.reindex_backlog()
    print(f"re-indexed {done} packages; {left} left")
    return 1 if left else 0


def _worker(data: MirrorData, settings: MirrorConfig) -> int:
    publisher = Publisher(settings.broker.url, settings.broker.heartbeat, architecture.MIRROR.bus)
    clean_incoming(settings.repo)
    fetcher = Fetcher(
        data,
        settings.repo,
        settings.mirror,
        koji_for(settings),
        publish=publisher.publish,
        gpg_keys=[settings.resolve(k) for k in settings.mirror.gpg_keys],
    )
    waits = WaitQueues(publisher, settings.mirror.retry_delays)
    try:
        run_worker(
            settings.broker.url,
            settings.broker.heartbeat,
            settings.mirror.retry_delays,
            MirrorHandler(
                fetcher,
                waits,
                data,
                settings.mirror.download_attempts,
                settings.broker.delivery_limit,
            ),
            MirrorDeadLetters(data, koji_for(settings)),
        )
    finally:
        publisher.close()
    return 0


def _prune(data: MirrorData, settings: MirrorConfig) -> int:
    done = prune(data, settings.repo, settings.mirror)
    print(f"pruned {done.packages} packages ({done.bytes} bytes)")
    return 0


def _sync(settings: MirrorConfig, args: argparse.Namespace) -> int:
    commands: list[MirrorBuildV1] = []
    action = MirrorAction.REMOVE if args.remove else MirrorAction.MIRROR
    try:
        if args.build is not None:
            ref: int | str = int(args.build) if args.build.isdigit() else args.build
            commands.append(MirrorBuildV1(build=ref, action=action, requested_by="cli"))
        else:
            koji = koji_for(settings)
            if args.since is not None:
                since = args.since if args.since.tzinfo else args.since.replace(tzinfo=UTC)
                builds = koji.completed_since(since)
            else:
                builds = koji.tagged(args.tag)
            commands = [MirrorBuildV1(build=b.id, requested_by="cli") for b in builds]
    except (KojiUnavailable, KojiError) as exc:
        print(f"retrace-mirror: {exc}", file=sys.stderr)
        return 1
    publisher = Publisher(settings.broker.url, role=architecture.MIRROR.bus)
    try:
        for command in commands:
            publisher.publish(MIRROR_BUILD, command)
            print(f"queued: {command.action} build {command.build}")
    except PublishError as exc:
        print(f"retrace-mirror: {exc}", file=sys.stderr)
        return 1
    finally:
        publisher.close()
    print(f"{len(commands)} builds queued for the mirror worker")
    return 0
