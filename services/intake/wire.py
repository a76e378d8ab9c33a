"""Header names on the wire as the original Retrace Server sent them.

HTTP header names are case-insensitive, but falcon sends them in lower case and
some clients of the original server (and people reading ``wget -S``) look for
``X-Task-Id`` and ``X-Task-Password`` exactly.  This WSGI wrapper restores the
canonical capitalization of every response header.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def canonical(name: str) -> str:
    """``x-task-id`` → ``X-Task-Id``."""
    return "-".join(part.capitalize() for part in name.split("-"))


def canonical_headers(app: WsgiApp) -> WsgiApp:
    """Wrap ``app`` so that its response header names are canonically capitalized."""

    def wrapped(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            return start_response(status, [(canonical(k), v) for k, v in headers], *exc_info)

        return app(environ, start)

    return wrapped
