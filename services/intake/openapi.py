"""``GET /openapi.json``: every route, header and status code of the public API."""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

import falcon

from schemas.messages import TASK_ID_PATTERN
from services.intake.upload import ACCEPTED_FILES, DECODERS, REQUIRED_FILES

TEXT = {"text/plain": {"schema": {"type": "string"}}}
JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}


def _text(description: str, **headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": TEXT}
    if headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return answer


RETRY = "Seconds to wait before trying again"
ROTATED = "The next single-use task password (absent in static mode)"

_PASSWORD_HEADER = {
    "name": "X-Task-Password",
    "in": "header",
    "required": True,
    "description": "The task password (single-use by default: use the one the last answer gave)",
    "schema": {"type": "string"},
}
_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "description": "The task id from X-Task-Id (a trailing slash is accepted too)",
    "schema": {"type": "string", "pattern": TASK_ID_PATTERN},
}


def _task_answers(ok: dict[str, Any]) -> dict[str, Any]:
    return {
        **ok,
        "403": {"$ref": "#/components/responses/Forbidden"},
        "404": _text(
            "No such task, or (log, backtrace) not there yet", **{"X-Task-Password": ROTATED}
        ),
        "405": _text("The id names one of the fixed routes, which do not take this method"),
        "429": _text(
            "Too many wrong passwords for this task from this address", **{"Retry-After": RETRY}
        ),
    }


def _task_operation(summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [_TASK_ID, _PASSWORD_HEADER],
        "responses": _task_answers(ok),
    }


def spec() -> dict[str, Any]:
    """The OpenAPI 3.0 description of the intake."""
    try:
        version = metadata.version("retrace-server")
    except metadata.PackageNotFoundError:
        version = "0"
    archive = {"schema": {"type": "string", "format": "binary"}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Retrace Server intake",
            "version": version,
            "description": (
                "The original Retrace Server's protocol. Every refusal has a plain-text body "
                "naming the file or field. With require_https, any plain-HTTP request is "
                "answered 403."
            ),
        },
        "paths": {
            "/create": {
                "post": {
                    "summary": "Upload a crash archive (a tar of an ABRT problem directory)",
                    "parameters": [
                        {
                            "name": "X-Task-Type",
                            "in": "header",
                            "required": False,
                            "description": "0 core retrace (default), 1 debug; 2-4 are 409",
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "description": (
                            "A tar of the problem directory's files, each at the archive's "
                            f"top: {', '.join(REQUIRED_FILES)} (required) and "
                            + ", ".join(f for f in ACCEPTED_FILES if f not in REQUIRED_FILES)
                            + " (optional; rootdir and os_release_in_rootdir as "
                            "abrt-retrace-client packs them); any other file is refused (403)"
                        ),
                        "content": dict.fromkeys(DECODERS, archive),
                    },
                    "responses": {
                        "201": _text(
                            "The task is queued",
                            **{
                                "X-Task-Id": "The new task's id",
                                "X-Task-Password": "The task's first password (32 characters)",
                            },
                        ),
                        "400": _text(
                            "Bad metadata, a core of an unsupported architecture, a corrupt "
                            "or truncated archive, an unknown X-Task-Type"
                        ),
                        "403": _text(
                            "An unsafe or unwanted member, a file over its cap, a missing "
                            "required file; or plain HTTP where HTTPS is required"
                        ),
                        "408": _text("The upload took too long"),
                        "409": _text("X-Task-Type 2-4: known, not offered here"),
                        "411": _text("No Content-Length"),
                        "413": _text(
                            "Over the packed or unpacked limit, or a decoder needing too much "
                            "memory"
                        ),
                        "415": _text("Not one of the supported content types"),
                        "429": _text(
                            "Too many uploads in flight from this address",
                            **{"Retry-After": RETRY},
                        ),
                        "503": _text(
                            "Too many tasks waiting or running, or the queue is unavailable",
                            **{"Retry-After": RETRY},
                        ),
                        "507": _text("The server is short of disk space"),
                    },
                }
            },
            "/{task_id}": {
                "get": _task_operation(
                    "The task's status and a one-line progress text",
                    {
                        "200": _text(
                            "Status",
                            **{
                                "X-Task-Status": "PENDING, FINISHED_SUCCESS or FINISHED_FAILURE",
                                "X-Task-Password": ROTATED,
                            },
                        )
                    },
                ),
                "delete": _task_operation(
                    "Delete the task and its crash data now",
                    {"204": {"description": "Deleted"}},
                ),
            },
            "/{task_id}/log": {
                "get": _task_operation(
                    "The task log, once finished",
                    {"200": _text("The log", **{"X-Task-Password": ROTATED})},
                )
            },
            "/{task_id}/backtrace": {
                "get": _task_operation(
                    "The backtrace, once finished with success "
                    "(Accept: application/json for the structured form)",
                    {
                        "200": {
                            **_text("The backtrace", **{"X-Task-Password": ROTATED}),
                            "content": {**TEXT, **JSON_OBJECT},
                        }
                    },
                )
            },
            "/settings": {
                "get": {
                    "summary": "Limits, formats and releases ('key value' lines, or JSON)",
                    "responses": {
                        "200": {
                            "description": "running_tasks, max_running_tasks, "
                            "max_packed_size, max_unpacked_size (MiB), supported_formats, "
                            "supported_releases (the configured releases and those the "
                            "mirror holds, spelled as ABRT's client spells its own: "
                            "fedora-40-x86_64, fedora-rawhide-x86_64, fedora-40-i386; "
                            "newest first, at most 32)",
                            "content": {**TEXT, **JSON_OBJECT},
                        },
                        "403": {"$ref": "#/components/responses/HttpsRequired"},
                    },
                }
            },
            "/checkpackage": {
                "get": {
                    "summary": "Whether the server can retrace a crash of this package",
                    "parameters": [
                        {
                            "name": "X-Package-NVR",
                            "in": "header",
                            "required": True,
                            "description": "name-[epoch:]version-release of the package or "
                            "of the build (source package) it comes from",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "X-Package-Arch",
                            "in": "header",
                            "required": True,
                            "description": "The package's architecture; i386 to i686 are "
                            "one, noarch packages match any",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "X-OS-Release",
                            "in": "header",
                            "required": False,
                            "description": "The release to look in, as ABRT's client spells "
                            "it (fedora-40-x86_64, fedora-rawhide-x86_64, fedora-40-i386); "
                            "absent: any release",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "302": {
                            "description": "The mirror has it, or Koji has it and the "
                            "mirror was told to fetch it (the task then waits for it); "
                            "no Location, by design"
                        },
                        "400": _text("A header is missing, not an NVR, or not a release"),
                        "403": {"$ref": "#/components/responses/HttpsRequired"},
                        "404": _text(
                            "Neither the mirror nor Koji (when the mirror can be asked in "
                            "time) has it, or the release is not one this server retraces"
                        ),
                        "429": _text(
                            "Too many lookups from this address", **{"Retry-After": RETRY}
                        ),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {"description": "Metrics", "content": TEXT},
                        "403": {"$ref": "#/components/responses/HttpsRequired"},
                    },
                }
            },
            "/__lbheartbeat__": {
                "get": {
                    "summary": "The process answers",
                    "responses": {"200": {"description": "Up", "content": JSON_OBJECT}},
                }
            },
            "/__heartbeat__": {
                "get": {
                    "summary": "Database, broker and spool space",
                    "responses": {
                        "200": {"description": "All healthy", "content": JSON_OBJECT},
                        "503": {
                            "description": "A dependency fails; the body names it",
                            "content": JSON_OBJECT,
                            "headers": {"Retry-After": {"schema": {"type": "string"}}},
                        },
                    },
                }
            },
            "/__version__": {
                "get": {
                    "summary": "Name and version",
                    "responses": {"200": {"description": "Version", "content": JSON_OBJECT}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This description",
                    "responses": {"200": {"description": "OpenAPI 3", "content": JSON_OBJECT}},
                }
            },
        },
        "components": {
            "responses": {
                "Forbidden": _text(
                    "Wrong or missing password, or plain HTTP where HTTPS is required"
                ),
                "HttpsRequired": _text("Plain HTTP where HTTPS is required"),
            }
        },
    }


class OpenApiResource:
    """Serves :func:`spec`."""

    def __init__(self) -> None:
        self._body = json.dumps(spec(), indent=1)

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self._body
