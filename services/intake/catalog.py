"""What the server offers: ``GET /settings`` and ``GET /checkpackage``."""

from __future__ import annotations

import json

import falcon

from services.common.settings import IntakeSettings
from services.common.store import Store
from services.intake.create import ACTIVE
from services.intake.errors import Refusal
from services.intake.upload import DECODERS


class SettingsResource:
    """``GET /settings``: limits, formats and releases, in the original's ``key value``
    lines, or as a JSON object when the client asks for ``application/json``."""

    def __init__(self, settings: IntakeSettings, store: Store) -> None:
        self._settings = settings
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limits = self._settings
        values: dict[str, int | list[str]] = {
            "running_tasks": self._store.count_tasks(ACTIVE),
            "max_running_tasks": limits.max_running_tasks,
            "max_packed_size": limits.max_packed_size_mib,
            "max_unpacked_size": limits.max_unpacked_size_mib,
            "supported_formats": list(DECODERS),
            "supported_releases": self._store.supported_releases(),
        }
        if wants_json(req):
            resp.content_type = falcon.MEDIA_JSON
            resp.text = json.dumps(values)
            return
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "".join(
            f"{key} {' '.join(value) if isinstance(value, list) else value}\n"
            for key, value in values.items()
        )


def wants_json(req: falcon.Request) -> bool:
    """Whether the client prefers JSON to plain text (the original's format)."""
    return req.client_prefers([falcon.MEDIA_TEXT, falcon.MEDIA_JSON]) == falcon.MEDIA_JSON and (
        "json" in (req.accept or "")
    )


class CheckPackageResource:
    """``GET /checkpackage``: whether the mirror has the build a crash needs.

    The answer to "yes" is a bare 302, as the original server's: it has no
    ``Location``, because a client that followed one would fail.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        nvr = (req.get_header("X-Package-NVR") or "").strip()
        arch = (req.get_header("X-Package-Arch") or "").strip()
        if not nvr or not arch:
            raise Refusal(
                400, "send the package as X-Package-NVR and X-Package-Arch", code="checkpackage"
            )
        parts = nvr.rsplit("-", 2)
        if len(parts) != 3 or not all(parts):
            raise Refusal(
                400, f"X-Package-NVR {nvr[:80]!r} is not name-version-release", code="checkpackage"
            )
        name, version, release = parts
        version = version.split(":", 1)[-1]  # an epoch, if given, is not part of the index key
        resp.content_type = falcon.MEDIA_TEXT
        if self._store.has_build(name, version, release, arch):
            resp.status = falcon.HTTP_302
            resp.text = ""
        else:
            raise Refusal(404, f"this server has no {nvr}.{arch}", code="no_package")
