"""Refusals: what the intake answers when a request cannot be served.

Every refusal has an HTTP status and one plain sentence naming the file or field
that was wrong; :func:`render_refusal` turns it into the answer in one place.
"""

from __future__ import annotations

from typing import Any

import falcon


class Refusal(Exception):
    """The request is refused; ``reason`` is shown to the client as plain text.

    ``code`` is a short, fixed name of the kind of refusal, for the metrics.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        headers: dict[str, str] | None = None,
        *,
        code: str = "",
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})
        self.code = code or str(status)


def render_refusal(
    req: falcon.Request, resp: falcon.Response, error: Refusal, _params: dict[str, Any]
) -> None:
    """Answer a :class:`Refusal` as a plain-text body, as the original server did.

    Headers set before the refusal (a rotated ``X-Task-Password``) are kept.
    """
    resp.status = falcon.code_to_http_status(error.status)
    resp.content_type = falcon.MEDIA_TEXT
    resp.text = error.reason + "\n"
    resp.data = None
    for name, value in error.headers.items():
        resp.set_header(name, value)
