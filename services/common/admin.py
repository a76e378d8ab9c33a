"""``retrace-admin``: database migrations, broker topology, a settings check and the diagram."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pika
import pika.exceptions

from services.common import architecture
from services.common.bus import (
    PolicyError,
    apply_policies,
    connect,
    declare_topology,
    topology_definitions,
)
from services.common.data import schema
from services.common.data.db import Database
from services.common.logs import setup_logging
from services.common.settings import (
    AdminConfig,
    AnalyzerConfig,
    ConfigError,
    IntakeConfig,
    MirrorConfig,
    ServiceConfig,
    load_settings,
)

SERVICE_CONFIGS: dict[str, type[ServiceConfig]] = {
    "intake": IntakeConfig,
    "mirror": MirrorConfig,
    "analyzer": AnalyzerConfig,
}
"""The settings each service reads, by the name of its schema branch."""


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 -- one return per command
    """Entry point of the ``retrace-admin`` command."""
    parser = argparse.ArgumentParser(prog="retrace-admin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser(
        "migrate",
        help="create or upgrade the database schema: every service's branch, or one",
    )
    migrate.add_argument(
        "--service",
        choices=[branch.name for branch in schema.ORDER],
        help="upgrade only this service's tables (a rolling upgrade, one service at a time)",
    )
    topology = sub.add_parser(
        "topology", help="declare exchanges, queues and bindings on the broker"
    )
    topology.add_argument(
        "--export",
        type=Path,
        metavar="FILE",
        help="write the topology and policies as a RabbitMQ definitions file instead",
    )
    sub.add_parser(
        "policies",
        help="set the command queues' delivery limit and dead-lettering (management API)",
    )
    sub.add_parser(
        "settings",
        help="check every section of the settings and print them, secrets masked "
        "(or every problem found, one a line)",
    )
    drawing = sub.add_parser(
        "architecture",
        help="print the architecture as a Mermaid flowchart, drawn from the code",
    )
    drawing.add_argument(
        "--readme",
        type=Path,
        metavar="FILE",
        help="replace the diagram between the architecture markers of FILE instead",
    )
    args = parser.parse_args(argv)
    if args.command == "architecture":
        # Drawn from the code alone: no settings, so every machine draws the same.
        return _architecture(args.readme)
    setup_logging()
    # The operator's tool checks every section, and knows of no section it ignores; but
    # one service's upgrade, run where that service runs, reads the settings as that
    # service does: another service's newer keys must not stop it.
    one_service = args.service if args.command == "migrate" else None
    try:
        settings = load_settings(SERVICE_CONFIGS.get(one_service or "", AdminConfig))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"retrace-admin: {problem}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        return _migrate(settings, one_service)
    assert isinstance(settings, AdminConfig)
    if args.command == "topology":
        arches = tuple(sorted({*settings.intake.arches, *settings.analyzer.arches}))
        if args.export is not None:
            return _export(settings, arches, args.export)
        try:
            connection = connect(settings.broker.url)
        except pika.exceptions.AMQPError as exc:
            print(f"retrace-admin: cannot reach the broker: {exc!r}", file=sys.stderr)
            return 1
        try:
            declare_topology(connection.channel(), arches)
        finally:
            connection.close()
        print(f"topology declared for {', '.join(arches)}")
    elif args.command == "policies":
        try:
            policies = apply_policies(
                settings.broker.management_url,
                settings.broker.url,
                settings.broker.delivery_limit,
                settings.broker.subscription_max_length,
            )
        except PolicyError as exc:
            print(f"retrace-admin: {exc}", file=sys.stderr)
            return 1
        for name, policy in policies.items():
            print(f"{name} applied to queues matching {policy['pattern']}: {policy['definition']}")
    else:
        print(json.dumps(settings.masked(), indent=2, sort_keys=True))
    return 0


def _migrate(settings: ServiceConfig, service: str | None) -> int:
    db = Database.from_url(settings.store_url)
    branches = schema.ORDER if service is None else (schema.BRANCHES[service],)
    try:
        carried, done = schema.migrate(db, branches)
    except schema.SchemaMismatch as exc:
        print(f"retrace-admin: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    if carried is not None:
        print(f"database schema: carried over from the single chain at {carried}")
    for step in done:
        print(f"{step.branch} schema: {step.before or 'empty'} -> {step.after}")
    return 0


def definitions_text(settings: AdminConfig, arches: tuple[str, ...]) -> str:
    """The definitions file for ``settings``'s broker vhost, arches, policies and delays."""
    definitions = topology_definitions(
        arches,
        pika.URLParameters(settings.broker.url).virtual_host,
        settings.broker.delivery_limit,
        settings.broker.subscription_max_length,
        settings.mirror.retry_delays,
    )
    return json.dumps(definitions, indent=2) + "\n"


def _export(settings: AdminConfig, arches: tuple[str, ...], path: Path) -> int:
    text = definitions_text(settings, arches)
    try:
        partial = path.with_name(path.name + ".part")
        partial.write_text(text)
        partial.replace(path)
    except OSError as exc:
        print(f"retrace-admin: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"topology for {', '.join(arches)} written to {path}")
    return 0


def _architecture(readme: Path | None) -> int:
    if readme is None:
        print(architecture.mermaid(), end="")
        return 0
    try:
        text = readme.read_text()
        updated = architecture.with_current_block(text)
        if updated != text:
            readme.write_text(updated)
    except (OSError, ValueError) as exc:
        print(f"retrace-admin: {readme}: {exc}", file=sys.stderr)
        return 1
    print(f"architecture diagram in {readme} is current")
    return 0
