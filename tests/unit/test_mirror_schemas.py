"""Mirror messages, and the fedora-messaging classes of every message model of ours."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.metadata import entry_points

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
    legacy_schema_name,
    parse,
)
from schemas.topology import MIRROR_BUILD, ROUTES
from services.common.bus import properties_for

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
    # The schema header fedora-messaging writes is the stable name, not a module path.
    assert received._headers["fedora_messaging_schema"] == type(model).schema_name
    assert parse(type(model), json.dumps(received.body)).model_dump() == model.model_dump()
    assert str(received).startswith(received.summary + "\n")
    assert json.loads(str(received).split("\n", 2)[2]) == received.body


@pytest.mark.parametrize("model", list(SAMPLES.values()), ids=lambda m: type(m).__name__)
def test_our_publishers_write_the_headers_fedora_messaging_writes(model: Message) -> None:
    ours = properties_for(next(r for r in ROUTES if r.model is type(model)), model).headers
    theirs = wrap(model)._headers
    assert ours is not None

    def named(headers: Mapping[str, object]) -> dict[str, object]:
        # fedora-messaging finds no distribution named after our module, so it leaves out
        # the package header our publishers add for consumers that lack our classes.
        skip = {"fedora_messaging_schema_package"}
        return {k: v for k, v in headers.items() if k.startswith("fedora_") and k not in skip}

    assert named(ours) == named(theirs)
    assert ours["fedora_messaging_schema_package"] == "retrace_server_messages"


def test_the_entry_points_register_every_schema_name_and_the_old_ones() -> None:
    registered = {
        ep.name: ep.load()
        for ep in entry_points(group="fedora.messages")
        if ep.dist is not None and ep.dist.name == "retrace-server-messages"
    }
    assert registered == fedora.registered_names()
    names = {r.model.schema_name for r in ROUTES}
    assert names == {"retrace.analyze.v1", "retrace.task.finished.v1",
                     "retrace.mirror.build.v1", "retrace.mirror.build.synced.v1"}  # fmt: skip
    assert {legacy_schema_name(r.model) for r in ROUTES} <= set(registered)
    assert names <= set(registered)


@pytest.mark.parametrize("model", list(SAMPLES.values()), ids=lambda m: type(m).__name__)
def test_a_message_sent_under_its_old_name_still_loads(model: Message) -> None:
    # What an older server published: our wire format under the module path name.
    route = next(r for r in ROUTES if r.model is type(model))
    props = properties_for(route, model)
    assert props.headers is not None
    props.headers = {**props.headers, "fedora_messaging_schema": legacy_schema_name(type(model))}
    received = fm.get_message(route.topic_for("x86_64"), props, model.model_dump_json().encode())
    current = wrap(model)
    assert isinstance(received, type(current))
    assert type(received) is not type(current)
    assert received.deprecated
    assert received.body == current.body
    assert received.summary == current.summary
    # Published again through fedora-messaging, it carries the stable name.
    assert fm.get_name(type(current)) == type(model).schema_name


def test_the_classes_follow_fedoras_conventions() -> None:
    finished = wrap(SAMPLES[TaskFinishedV1])
    assert finished.app_name == "retrace-server"
    assert finished.summary == ("Retrace task abcdefgh12 (x86_64) succeeded: the crash is in f")
    assert finished.usernames == []
    assert finished.packages == []
    assert finished.url is None
    failed = TaskFinishedV1(
        task_id="abcdefgh12", arch="aarch64", outcome=Outcome.FAILURE, reason="gdb timed out"
    )
    assert wrap(failed).summary == "Retrace task abcdefgh12 (aarch64) failed: gdb timed out"
    assert wrap(SAMPLES[AnalyzeTaskV1]).summary == "Retrace task abcdefgh12 (x86_64) queued"
    synced = wrap(SAMPLES[BuildSyncedV1])
    assert synced.summary == (
        "The mirror synced crasher-1.0-1.fc40 (Koji build 42, fedora-40): 1 package, 1 new file"
    )
    assert synced.packages == ["crasher"]
    command = wrap(SAMPLES[MirrorBuildV1])
    assert command.summary == "Mirror Koji build crasher-1.0-1.fc40 (asked by listener)"
    assert command.packages == ["crasher"]
    assert wrap(MirrorBuildV1(build=42)).packages == []
    assert "fedora_messaging_rpm_crasher" in command._headers


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
