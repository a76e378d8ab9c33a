"""``retrace-admin``: database migrations, broker topology and a settings check."""

from __future__ import annotations

import argparse
import json
import sys

import pika.exceptions

from services.common.bus import PolicyError, apply_policies, connect, declare_topology
from services.common.logs import setup_logging
from services.common.settings import ConfigError, load_settings
from services.common.store import Store


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retrace-admin`` command."""
    parser = argparse.ArgumentParser(prog="retrace-admin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the database schema")
    sub.add_parser("topology", help="declare exchanges, queues and bindings on the broker")
    sub.add_parser(
        "policies",
        help="set the command queues' delivery limit and dead-lettering (management API)",
    )
    sub.add_parser("settings", help="print the settings in force, secrets masked")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"retrace-admin: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        store = Store.from_url(settings.store_url)
        before = store.current_revision()
        after = store.migrate()
        print(f"database schema: {before or 'empty'} -> {after}")
    elif args.command == "topology":
        arches = tuple(sorted({*settings.intake.arches, *settings.analyzer.arches}))
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
            policy = apply_policies(
                settings.broker.management_url, settings.broker.url, settings.broker.delivery_limit
            )
        except PolicyError as exc:
            print(f"retrace-admin: {exc}", file=sys.stderr)
            return 1
        print(f"policy applied to queues matching {policy['pattern']}: {policy['definition']}")
    else:
        print(json.dumps(settings.masked(), indent=2, sort_keys=True))
    return 0
