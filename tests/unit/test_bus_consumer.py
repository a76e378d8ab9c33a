"""What a consumer subscribes to, before it ever connects."""

from __future__ import annotations

import pytest

from schemas.topology import ANALYZE, MIRROR_BUILD
from services.common.bus import Consumer, Delivery


def ignore(_delivery: Delivery) -> None:
    pass


def test_a_consumer_given_no_arch_takes_only_queues_without_one() -> None:
    """The mirror's worker: its commands have one queue whatever the arch."""
    consumer = Consumer("amqp://127.0.0.1:9/", heartbeat=5, arches=())
    consumer.subscribe(MIRROR_BUILD, ignore)
    with pytest.raises(ValueError, match=r"retrace\.analyze\.v1\.\{arch\} has a queue per arch"):
        consumer.subscribe(ANALYZE, ignore)
