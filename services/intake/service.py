"""Wiring the intake from settings: the store, the spool and the broker."""

from __future__ import annotations

import logging
import os

import falcon

from services.common import architecture
from services.common.bus import Publisher
from services.common.data.db import Database
from services.common.data.intake import IntakeData
from services.common.data.mirror import MirrorData
from services.common.logs import setup_logging
from services.common.settings import IntakeConfig, load_settings, log_settings
from services.common.spool import Spool
from services.intake.app import create_app
from services.intake.health import AmqpProbe
from services.intake.leases import Leases
from services.intake.worker import UPLOAD_SLOTS


def build_app() -> falcon.App[falcon.Request, falcon.Response]:
    """Read and check the settings, check the schema, and build the application."""
    setup_logging()
    settings = load_settings(IntakeConfig)
    log_settings(settings, "retrace-intake")
    db = Database.from_url(settings.store_url)
    architecture.INTAKE.check_schema(db)
    data = IntakeData(db)
    publisher = Publisher(settings.broker.url, settings.broker.heartbeat, architecture.INTAKE.bus)
    logging.getLogger(__name__).info("intake ready; spool %s", settings.spool)
    probe = AmqpProbe(settings.broker.url, settings.intake.arches)
    spool = Spool(settings.spool)
    # Renews this worker's upload leases and sweeps those of dead workers.
    leases = Leases(data, spool)
    leases.start()
    # Set in each worker by the gunicorn config (services/intake/gunicorn_conf.py).
    slots = os.environ.get(UPLOAD_SLOTS)
    return create_app(
        settings,
        data,
        MirrorData(db),
        spool,
        publisher.publish,
        broker=probe,
        leases=leases,
        upload_slots=int(slots) if slots else None,
    )
