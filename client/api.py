"""The Retrace Server HTTP protocol, as the original server and ABRT's client speak it."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

from client.errors import Refused, Unavailable

CHUNK = 1 << 16
TIMEOUT = 120
XZ_TAR = "application/x-xz-compressed-tar"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Answer:
    """One HTTP answer."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", errors="replace")


class Server:
    """A Retrace Server at ``uri`` (``https://host`` or ``http://host:port``)."""

    def __init__(self, uri: str, insecure: bool = False) -> None:
        if "://" not in uri:
            uri = "https://" + uri
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused(f"{uri!r} is not an http or https server address")
        self.uri = uri.rstrip("/")
        self._parts = parts
        self._prefix = parts.path.rstrip("/")
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._context = ssl.create_default_context()
            if insecure:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._parts.port
        if self._context is not None:
            return http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=self._context)
        return http.client.HTTPConnection(host, port, timeout=TIMEOUT)

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: BinaryIO | None = None,
        size: int = 0,
        progress: Progress | None = None,
    ) -> Answer:
        """Send one request; a network failure or a 5xx answer raises :class:`Unavailable`."""
        conn = self._connection()
        try:
            conn.putrequest(method, self._prefix + path)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(size))
            conn.endheaders()
            if body is not None:
                sent = 0
                while chunk := body.read(CHUNK):
                    conn.send(chunk)
                    sent += len(chunk)
                    if progress:
                        progress(sent, size)
            answer = conn.getresponse()
            result = Answer(answer.status, answer.headers, answer.read())
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"cannot talk to {self.uri}: {exc}") from exc
        finally:
            conn.close()
        if result.status >= 500:
            retry = result.headers.get("Retry-After")
            hint = f" (retry after {retry} s)" if retry else ""
            raise Unavailable(f"{self.uri} answered {result.status}{hint}: {result.text.strip()}")
        return result

    def settings(self) -> dict[str, str]:
        """``GET /settings`` as a dict of its ``key value`` lines."""
        answer = self.request("GET", "/settings")
        if answer.status != 200:
            raise Refused(f"{self.uri}/settings answered {answer.status}")
        pairs = (line.split(" ", 1) for line in answer.text.splitlines() if " " in line)
        return {key: value.strip() for key, value in pairs}

    def has_package(self, nvr: str, arch: str, os_release: str | None = None) -> bool:
        """Whether the server's mirror has the package (``GET /checkpackage``: 302 or 404)."""
        headers = {"X-Package-NVR": nvr, "X-Package-Arch": arch}
        if os_release:
            headers["X-OS-Release"] = os_release
        return self.request("GET", "/checkpackage", headers).status == 302

    def create(
        self, archive: BinaryIO, size: int, progress: Progress | None = None
    ) -> tuple[str, str]:
        """Upload a packed crash; return the task id and its password."""
        answer = self.request("POST", "/create", {"Content-Type": XZ_TAR}, archive, size, progress)
        if answer.status != 201:
            raise Refused(f"the server refused the crash ({answer.status}): {answer.text.strip()}")
        task, password = answer.headers.get("X-Task-Id"), answer.headers.get("X-Task-Password")
        if not task or not password:
            raise Unavailable("the server accepted the crash but sent no task id or password")
        return task, password

    def task(self, task: str, password: str, suffix: str = "", accept: str | None = None) -> Answer:
        """``GET /<task><suffix>`` with the task password; 403 and 404 raise :class:`Refused`."""
        headers = {"X-Task-Password": password}
        if accept:
            headers["Accept"] = accept
        answer = self.request("GET", f"/{task}{suffix}", headers)
        if answer.status == 403:
            raise Refused(f"the server refused the password of task {task}: {answer.text.strip()}")
        if answer.status == 404:
            raise Refused(f"task {task}{suffix}: {answer.text.strip() or 'not found'}")
        if answer.status != 200:
            raise Refused(f"task {task}{suffix} answered {answer.status}: {answer.text.strip()}")
        return answer


def next_password(answer: Answer, current: str) -> str:
    """The password to use next: the server may rotate it with every answer."""
    return answer.headers.get("X-Task-Password") or current


def parse_json(body: bytes) -> object:
    """The body of a JSON answer."""
    try:
        return json.loads(body)
    except ValueError as exc:
        raise Unavailable(f"the server's JSON answer does not parse: {exc}") from exc
