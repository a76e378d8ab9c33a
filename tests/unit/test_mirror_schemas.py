"""Mirror messages, and the fedora-messaging classes of every message model of ours."""

from __future__ import annotations

import json

import jsonschema
import pytest
from fedora_messaging import message as fm
from pydantic import ValidationError

from schemas import fedora
from schemas.messages import (
    AnalyzeTaskV1,
    BuildSyncedV1,
    Message,
    MirrorAction,
    MirrorBuildV1,
    Outcome,
    TaskFinishedV1,
    parse,
)
from schemas.topology import MIRROR_BUILD, ROUTES

SAMPLES: dict[type[Message], Message] = {
    AnalyzeTaskV1: AnalyzeTaskV1(task_id="abcdefgh12", arch="x86_64"),
    TaskFinishedV1: TaskFinishedV1(
        task_id="abcdefgh12", arch="x86_64", outcome=Outcome.SUCCESS, crash_function="f"
    ),
    MirrorBuildV1: MirrorBuildV1(build="crasher-1.0-1.fc40", requested_by="listener"),
    BuildSyncedV1: BuildSyncedV1(
        build_id=42,
        nvr="crasher-1.0-1.fc40",
        os_release="fedora-40",
        packages=("crasher-1.0-1.fc40.x86_64",),
        new_files=1,
    ),
}


def wrap(model: Message) -> fedora.RetraceMessage:
    cls = next(c for c in fedora.CLASSES if c.route.model is type(model))
    return cls(body=json.loads(model.model_dump_json()))


def test_every_message_model_has_a_fedora_messaging_class() -> None:
    assert {c.route.model for c in fedora.CLASSES} == {r.model for r in ROUTES}
    assert set(SAMPLES) == {r.model for r in ROUTES}


@pytest.mark.parametrize("model", list(SAMPLES.values()), ids=lambda m: type(m).__name__)
def test_each_message_round_trips_through_fedora_messaging(model: Message) -> None:
    sent = wrap(model)
    sent.validate()
    (received,) = fm.loads(fm.dumps(sent))
    assert type(received) is type(sent)
    assert received.body == sent.body
    # The schema header fedora-messaging writes is the one our pika publishers write.
    assert received._headers["fedora_messaging_schema"] == (
        f"schemas.messages:{type(model).__name__}"
    )
    assert parse(type(model), json.dumps(received.body)).model_dump() == model.model_dump()
    assert type(model).__name__ in str(received)


@pytest.mark.parametrize("model", list(SAMPLES.values()), ids=lambda m: type(m).__name__)
def test_validate_accepts_a_field_from_a_newer_producer(model: Message) -> None:
    body = {**json.loads(model.model_dump_json()), "added_in_v1_1": "anything"}
    wrap(model).__class__(body=body).validate()


@pytest.mark.parametrize("model", list(SAMPLES.values()), ids=lambda m: type(m).__name__)
def test_validate_rejects_a_body_missing_a_required_field(model: Message) -> None:
    body = json.loads(model.model_dump_json())
    required = type(model).model_json_schema()["required"]
    del body[required[0]]
    with pytest.raises(jsonschema.ValidationError):
        wrap(model).__class__(body=body).validate()


def test_validate_rejects_a_field_of_the_wrong_type() -> None:
    body = {**json.loads(SAMPLES[BuildSyncedV1].model_dump_json()), "build_id": "forty-two"}
    with pytest.raises(jsonschema.ValidationError):
        fedora.BuildSyncedV1(body=body).validate()


def test_a_mirror_command_names_a_build_by_id_or_nvr() -> None:
    assert MirrorBuildV1(build=42).build == 42
    assert parse(MirrorBuildV1, '{"build": 42}').build == 42
    assert parse(MirrorBuildV1, '{"build": "bash-5.2-1.fc40"}').build == "bash-5.2-1.fc40"
    assert MirrorBuildV1(build=7, action=MirrorAction.REMOVE).action == "remove"
    with pytest.raises(ValidationError):
        MirrorBuildV1(build="../../etc/passwd")
    assert MIRROR_BUILD.command
