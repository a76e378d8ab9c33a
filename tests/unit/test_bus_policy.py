"""The command-queue policy: which queues it takes, and the x-death reading shared by consumers."""

from __future__ import annotations

import re

from schemas.topology import ANALYZE, MIRROR_BUILD
from services.common.bus import command_queue_pattern, death_reason
from services.mirror.deadletters import build_ref_of, mirror_death_reason
from services.mirror.worker import wait_queue


def test_the_policy_takes_every_command_queue() -> None:
    pattern = re.compile(command_queue_pattern())
    assert pattern.match(MIRROR_BUILD.queue_for())
    for arch in ("x86_64", "aarch64", "ppc64le", "s390x"):
        assert pattern.match(ANALYZE.queue_for(arch))


def test_the_policy_leaves_wait_and_dead_letter_queues_alone() -> None:
    # A wait queue dead-letters back to the work exchange by its own arguments; the
    # policy's dead-letter exchange there would send waiting commands to the dead letters.
    pattern = re.compile(command_queue_pattern())
    for seconds in (1, 30, 600):
        assert not pattern.match(wait_queue(seconds))
    assert not pattern.match(MIRROR_BUILD.dead_letter_queue_for())
    assert not pattern.match(ANALYZE.dead_letter_queue_for("x86_64"))


def test_a_delivery_limit_death_reads_as_a_sentence() -> None:
    headers = {
        "x-first-death-reason": "delivery_limit",
        "x-first-death-queue": "retrace.mirror.build",
        "x-death": [{"reason": "delivery_limit", "queue": "retrace.mirror.build", "count": 1}],
    }
    reason = mirror_death_reason(headers)
    assert reason.startswith("The mirror command was given up")
    assert reason.endswith("(RabbitMQ: delivery_limit on retrace.mirror.build).")


def test_an_unknown_death_reason_is_still_named() -> None:
    reason = death_reason({"x-death": [{"reason": "odd", "queue": "q"}]}, {}, "it died")
    assert reason == "It died (RabbitMQ: odd on q)."


def test_only_a_plain_build_reference_is_trusted() -> None:
    assert build_ref_of(b'{"build": 42}') == 42
    assert build_ref_of(b'{"build": "bash-5.2-1.fc40"}') == "bash-5.2-1.fc40"
    for body in (b"not json", b"[]", b'{"build": true}', b'{"build": -1}', b'{"build": "x"}'):
        assert build_ref_of(body) is None
