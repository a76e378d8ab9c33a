"""Header names on the wire as the original Retrace Server sent them.

HTTP header names are case-insensitive, but falcon sends them in lower case and
some clients of the original server (and people reading ``wget -S``) look for
``X-Task-Id`` and ``X-Task-Password`` exactly.  This WSGI wrapper restores the
canonical capitalization of every response header.

It also carries out an application's ``Connection: close``: a WSGI application may
not send hop-by-hop headers (PEP 3333), and gunicorn drops them, so the wrapper asks
gunicorn's response to close the connection instead (gunicorn then writes the
header, and closes with a bounded lingering read, RFC 9112 section 9.6).
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
            close = any(
                k.lower() == "connection" and v.strip().lower() == "close" for k, v in headers
            )
            # gunicorn's start_response is a method of its response object.
            force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
            if close and callable(force_close):
                force_close()
                headers = [(k, v) for k, v in headers if k.lower() != "connection"]
            return start_response(status, [(canonical(k), v) for k, v in headers], *exc_info)

        return app(environ, start)

    return wrapped
