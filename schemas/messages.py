"""The bodies of every message on the bus, as pydantic models.

Each model is the *producer* form: frozen, and unknown fields are an error, so a
service never publishes a field it did not mean to.  Consumers parse with
:func:`parse`, which uses the *lenient* form of the same model (unknown fields
ignored), so a rolling upgrade that adds an optional field never dead-letters
live work.  A breaking change is a new class (``...V2``) sent alongside the old.

Each model has a stable :attr:`~Message.schema_name` (``retrace.task.finished.v1``):
what publishers put in the ``fedora_messaging_schema`` header and what the
``fedora.messages`` entry point of :mod:`schemas.fedora` is called.  This module and
:mod:`schemas.topology` need pydantic only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.nvr import parse_nvr

TASK_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
"""What a task id looks like, everywhere: the intake makes 24 letters and digits."""
TaskId = Annotated[str, StringConstraints(pattern=TASK_ID_PATTERN)]
Arch = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]


def _now() -> datetime:
    return datetime.now(UTC)


SCHEMA_PACKAGE = "retrace_server_messages"
"""This distribution as fedora-messaging names it in the ``fedora_messaging_schema_package``
header: what a consumer lacking our classes is told to install."""


class Message(BaseModel):
    """Base of every message body: frozen, strict about unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_name: ClassVar[str]
    """The stable name of this message type on the wire; it never changes with the
    module or class name.  A breaking change is a new model with a new name."""

    def package_names(self) -> list[str]:
        """Names of the RPM packages (builds) the message is about, for filtering.

        fedora-messaging's ``packages``; our publishers also set its
        ``fedora_messaging_rpm_<name>`` headers from it.
        """
        return []


class TaskType(StrEnum):
    """What the submitter asked for (the original's ``X-Task-Type``)."""

    RETRACE = "retrace"
    DEBUG = "debug"


class AnalyzeTaskV1(Message):
    """Command: retrace the crash of task ``task_id``; its files are in the spool."""

    schema_name: ClassVar[str] = "retrace.analyze.v1"

    task_id: TaskId
    arch: Arch
    task_type: TaskType = TaskType.RETRACE
    submitted_at: datetime = Field(default_factory=_now)
    fetch_attempt: int = Field(default=0, ge=0)
    """How many times the task had asked the mirror for its crashed build when this
    copy was sent (0 for the intake's command); a copy older than the task's last
    request is stale and does nothing."""
    lease_waits: int = Field(default=0, ge=0)
    """How many times this command waited because a live analyzer held its task (the
    broker had returned it after a lost connection); bounded, then it is taken over."""


class Outcome(StrEnum):
    """How a task ended."""

    SUCCESS = "success"
    FAILURE = "failure"


class TaskFinishedV1(Message):
    """Event: a task reached a final state."""

    schema_name: ClassVar[str] = "retrace.task.finished.v1"

    task_id: TaskId
    arch: Arch
    outcome: Outcome
    reason: str | None = None
    crash_function: str | None = None
    crash_module: str | None = None
    finished_at: datetime = Field(default_factory=_now)


Nvr = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9._+~^-]+-[^-/]+-[^-/]+$", max_length=512)
]
OsRelease = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]{1,64}$")]


class MirrorAction(StrEnum):
    """What a mirror command asks for."""

    MIRROR = "mirror"
    REMOVE = "remove"


class MirrorBuildV1(Message):
    """Command: mirror (or remove) the Koji build ``build``, a build id or an NVR.

    ``requested_by`` says who asked (the Koji listener, the catch-up, an analyzer,
    the command line) and is only logged.
    """

    schema_name: ClassVar[str] = "retrace.mirror.build.v1"

    build: int | Nvr
    action: MirrorAction = MirrorAction.MIRROR
    requested_by: str = "cli"
    requested_at: datetime = Field(default_factory=_now)

    def package_names(self) -> list[str]:
        """The build's (source) package name, when the command names it by NVR."""
        return [package_name(self.build)] if isinstance(self.build, str) else []


class BuildSyncedV1(Message):
    """Event: the mirror holds (or, for ``remove``, no longer holds) a Koji build."""

    schema_name: ClassVar[str] = "retrace.mirror.build.synced.v1"

    build_id: int
    nvr: Nvr
    os_release: OsRelease
    action: MirrorAction = MirrorAction.MIRROR
    packages: tuple[str, ...] = ()
    """NEVRAs of the build's RPMs the mirror placed or removed."""
    new_files: int = 0
    synced_at: datetime = Field(default_factory=_now)

    def package_names(self) -> list[str]:
        """The build's (source) package name."""
        return [package_name(self.nvr)]


def package_name(nvr: str) -> str:
    """The name part of an NVR (``crasher-1.0-1.fc40`` → ``crasher``)."""
    parsed = parse_nvr(nvr)
    return nvr if parsed is None else parsed.name


def legacy_schema_name(model: type[Message]) -> str:
    """The ``module:Class`` name the server published before schema names were stable.

    Still registered with fedora-messaging (as deprecated classes) for one release,
    so that messages an older server sent still load; remove in the release after.
    """
    return f"schemas.messages:{model.__name__}"


M = TypeVar("M", bound=Message)


@cache
def lenient(model: type[M]) -> type[M]:
    """The consumer form of ``model``: the same fields, unknown ones ignored."""
    config = ConfigDict(extra="ignore", frozen=True)
    return type(model.__name__, (model,), {"model_config": config, "__module__": model.__module__})


def parse(model: type[M], body: bytes | str) -> M:
    """Parse a received body as ``model``, ignoring fields this version does not know."""
    parsed: M = lenient(model).model_validate_json(body)
    return parsed


def consumer_schema(model: type[Message]) -> dict[str, Any]:
    """JSON schema of the lenient form: what a consumer of ``model`` accepts."""
    schema: dict[str, Any] = lenient(model).model_json_schema()
    return schema
