"""Producers forbid unknown fields; consumers ignore them (rolling upgrades)."""

import json
import re
import subprocess
import sys
from importlib.metadata import requires

import pytest
from pydantic import ValidationError

from schemas.messages import (
    AnalyzeTaskV1,
    Outcome,
    TaskFinishedV1,
    consumer_schema,
    legacy_schema_name,
    parse,
)
from schemas.topology import (
    ANALYZE,
    ANALYZE_WAIT,
    MIRROR_WAIT,
    ROUTES,
    SUBSCRIPTIONS,
    TASK_FINISHED,
)
from services.common.bus import command_queue_pattern


def test_producer_refuses_an_unknown_field() -> None:
    with pytest.raises(ValidationError, match="extra"):
        AnalyzeTaskV1(task_id="abcdefgh12", arch="x86_64", surprise=1)  # type: ignore[call-arg]


def test_consumer_ignores_a_field_added_by_a_newer_producer() -> None:
    body = json.dumps(
        {"task_id": "abcdefgh12", "arch": "x86_64", "priority": "high", "task_type": "retrace"}
    )
    command = parse(AnalyzeTaskV1, body)
    assert isinstance(command, AnalyzeTaskV1)
    assert command.task_id == "abcdefgh12"
    assert not hasattr(command, "priority")


def test_consumer_still_rejects_a_body_missing_a_required_field() -> None:
    with pytest.raises(ValidationError, match="arch"):
        parse(AnalyzeTaskV1, json.dumps({"task_id": "abcdefgh12"}))


def test_a_published_body_parses_back_to_the_same_message() -> None:
    event = TaskFinishedV1(
        task_id="abcdefgh12",
        arch="x86_64",
        outcome=Outcome.SUCCESS,
        crash_function="crasher_parse_record",
        crash_module="/usr/lib64/libcrasher.so.1",
    )
    assert parse(TaskFinishedV1, event.model_dump_json()).model_dump() == event.model_dump()


def test_task_ids_that_could_escape_the_spool_are_refused() -> None:
    with pytest.raises(ValidationError):
        AnalyzeTaskV1(task_id="../../etc", arch="x86_64")


def test_consumer_schema_allows_additional_properties() -> None:
    strict = AnalyzeTaskV1.model_json_schema()
    lenient = consumer_schema(AnalyzeTaskV1)
    assert strict.get("additionalProperties") is False
    assert "additionalProperties" not in lenient
    assert lenient["required"] == strict["required"]


def test_every_route_is_named_once_and_versioned() -> None:
    topics = [route.topic for route in ROUTES]
    assert len(set(topics)) == len(topics)
    assert all(".v1" in topic for topic in topics)
    assert ANALYZE.topic_for("aarch64") == "retrace.analyze.v1.aarch64"
    assert ANALYZE.queue_for("aarch64") == "retrace.analyze.aarch64"
    with pytest.raises(ValueError, match="event"):
        TASK_FINISHED.queue_for()


def test_wait_queues_are_named_in_the_table_and_escape_the_command_policy() -> None:
    assert ANALYZE_WAIT.queue_for(120, "x86_64") == "retrace.analyze.x86_64.wait.120s"
    assert MIRROR_WAIT.queue_for(15) == "retrace.mirror.build.wait.15s"
    assert ANALYZE_WAIT.route is ANALYZE
    pattern = command_queue_pattern()
    # A wait queue dead-letters back to its route; the command policy must not redirect it.
    assert re.fullmatch(pattern, ANALYZE_WAIT.queue_for(120, "x86_64")) is None
    assert re.fullmatch(pattern, ANALYZE.queue_for("x86_64")) is not None
    assert [s.queue_for() for s in SUBSCRIPTIONS] == ["retrace.analyzer.build-synced"]
    assert all(s.topic in {r.topic for r in ROUTES} and not s.command for s in SUBSCRIPTIONS)


def test_every_message_type_has_a_stable_schema_name_of_its_own() -> None:
    models = {route.model for route in ROUTES}
    names = {model.schema_name for model in models}
    assert len(names) == len(models)
    assert all(re.fullmatch(r"retrace(\.[a-z]+)+\.v[0-9]+", name) for name in names)
    assert TaskFinishedV1.schema_name == "retrace.task.finished.v1"
    # What a consumer parses is the same message type, under the same name.
    body = '{"task_id": "abcdefgh12", "arch": "x86_64", "outcome": "success"}'
    assert type(parse(TaskFinishedV1, body)).schema_name == "retrace.task.finished.v1"
    assert legacy_schema_name(TaskFinishedV1) == "schemas.messages:TaskFinishedV1"


def test_the_schemas_distribution_needs_pydantic_only_without_its_extra() -> None:
    plain = [r for r in requires("retrace-server-messages") or [] if "extra ==" not in r]
    assert [r.split("<")[0].split(">")[0] for r in plain] == ["pydantic"]
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, schemas.messages, schemas.topology; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in "
         "{'fedora_messaging', 'twisted', 'services'}))"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert imported.strip() == "[]"


def test_the_intake_and_analyzer_do_not_pull_in_fedora_messaging() -> None:
    """Only the mirror's extra (its Koji listener) brings fedora-messaging and Twisted."""
    needed = [
        r.split(";")[0].strip().lower()
        for r in requires("retrace-server") or []
        if "extra ==" not in r or 'extra == "intake"' in r or 'extra == "analyzer"' in r
    ]
    assert any(r.startswith("retrace-server-messages") for r in needed)
    assert not [r for r in needed if "fedora-messaging" in r or "twisted" in r]
