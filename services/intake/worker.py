"""The intake's gunicorn worker: gthread, with silent sockets kept out of the threads.

gunicorn's ``gthread`` worker hands every new connection to a thread, which waits up
to 5 s for the request to begin, and a kept-alive connection to a thread as soon as
one byte of its next request arrives, which then blocks until the whole head is in.
Idle sockets, or clients that send their head a byte at a time, so hold every
thread: 20 idle sockets delayed ``/__lbheartbeat__`` by 4.5 s, 200 stopped it.

This worker waits for request heads in its event loop instead: a connection reaches
a thread only once the head of its request (up to the blank line) has arrived, and
a connection that does not send a whole head within :data:`HEAD_SECONDS` is closed.
A thread then serves the request with blocking reads as before: the intake streams
and decodes uploads in real threads (the decoders release the GIL), and only a body
that is being received holds a thread.  The intake caps the uploads one worker
receives at once below its thread count (see ``upload_slots``), so status requests
and heartbeats always find a thread.

Closing a connection after an answer lingers in the event loop too (gthread reads a
refused body's rest for up to 2 s in its main loop, holding up every other socket).

Used as ``worker_class = "services.intake.worker.IntakeWorker"``; TLS and HTTP/2
connections (which the intake does not use: a proxy terminates TLS) are served by
gthread's own code.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from collections import deque
from functools import partial
from typing import Any

# gunicorn ships no type information.
from gunicorn.http2 import negotiation  # type: ignore[import-untyped]
from gunicorn.workers.gthread import TConn, ThreadWorker  # type: ignore[import-untyped]

HEAD_SECONDS = 10.0
"""How long a connection may take to send a request's head (line and headers), from
its first byte, or from connecting."""

HEAD_LIMIT = 64 << 10
"""Past this many bytes without the blank line, the head goes to a thread anyway,
whose parser refuses it by gunicorn's own limits."""

LINGER_SECONDS = 5.0
LINGER_BYTES = 4 << 20
"""A connection closed after an answer (``Connection: close``) is half-closed, then read
and dropped for at most this long and this much, so that a client still sending a
body we refused reads our answer rather than a reset (RFC 9112 section 9.6)."""

RESERVED_THREADS = 8
"""Threads of a worker that uploads may never take: they serve everything else."""


UPLOAD_SLOTS = "RETRACE_INTAKE_UPLOAD_SLOTS"
"""The environment variable that tells a worker's intake its :func:`upload_slots`."""


def upload_slots(threads: int) -> int:
    """How many uploads a worker with ``threads`` threads receives at once."""
    return max(1, threads - RESERVED_THREADS)


class _Conn(TConn):  # type: ignore[misc]
    """A connection whose graceful close lingers in the worker's event loop."""

    def __init__(self, worker: IntakeWorker, *args: Any) -> None:
        super().__init__(*args)
        self.worker = worker
        self.head: bytearray | None = None
        self.lingered = 0

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self.worker.linger(self)
        else:
            super().close()


class IntakeWorker(ThreadWorker):  # type: ignore[misc]
    """gthread, waiting for each request's head in the event loop, not in a thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Connections whose request head is still coming, oldest first.
        self.heads: deque[_Conn] = deque()
        # Connections half-closed after their answer, read until the client closes.
        self.lingering: deque[_Conn] = deque()

    def linger(self, conn: _Conn) -> None:
        """Half-close ``conn`` and read what the client still sends, for a bounded time
        and amount, then close it (called in the event loop)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_linger, conn))
        except (OSError, ValueError, KeyError):
            with contextlib.suppress(OSError):
                conn.sock.close()
            return
        conn.timeout = time.monotonic() + LINGER_SECONDS
        self.lingering.append(conn)

    def _on_linger(self, conn: _Conn, client: Any) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.lingered += len(data)
        if data and conn.lingered < LINGER_BYTES:
            return
        self.poller.unregister(client)
        self.lingering.remove(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _buffers_heads(self, client: Any) -> bool:
        return not self.cfg.is_ssl and not negotiation.prior_knowledge_allowed(self.cfg, client)

    def accept(self, listener: Any) -> None:
        """A new connection waits for its request's head without a thread."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = _Conn(self, self.cfg, client_sock, client_addr, listener.getsockname())
        if not self._buffers_heads(client_addr):
            client_sock.setblocking(True)
            self.enqueue_req(conn)
            return
        conn.head = bytearray()
        self._wait_for_head(conn)

    def on_client_socket_readable(self, conn: _Conn, client: Any) -> None:
        """A kept-alive connection's next request begins: wait for its whole head."""
        if not self._buffers_heads(conn.client):
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        conn.head = bytearray()
        if self._read_head(conn):
            self._wait_for_head(conn)

    def _wait_for_head(self, conn: _Conn) -> None:
        conn.timeout = time.monotonic() + HEAD_SECONDS
        self.heads.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head, conn))

    def _on_head(self, conn: _Conn, client: Any) -> None:
        if not self._read_head(conn):
            self.poller.unregister(client)
            self.heads.remove(conn)

    def _read_head(self, conn: _Conn) -> bool:
        """Read what has come of the head; ``False`` once the connection left our hands
        (handed to a thread, or closed)."""
        try:
            data = conn.sock.recv(HEAD_LIMIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            self.nr_conns -= 1
            conn.close()
            return False
        assert conn.head is not None
        conn.head += data
        if b"\r\n\r\n" not in conn.head and len(conn.head) < HEAD_LIMIT:
            return True
        conn.data_ready = True
        conn.sock.setblocking(True)
        self.enqueue_req(conn)
        return False

    def murder_pending(self) -> None:
        """Close connections whose head did not arrive in time, and end lingering."""
        super().murder_pending()
        now = time.monotonic()
        while self.heads and self.heads[0].timeout <= now:
            conn = self.heads.popleft()
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.poller.unregister(conn.sock)
            self.nr_conns -= 1
            conn.close()
        while self.lingering and self.lingering[0].timeout <= now:
            conn = self.lingering.popleft()
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.poller.unregister(conn.sock)
            with contextlib.suppress(OSError):
                conn.sock.close()

    def handle(self, conn: _Conn) -> Any:
        """Serve the request whose head the event loop has read (in a thread)."""
        head = conn.head
        if head:
            conn.head = None
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(bytes(head))
        return super().handle(conn)
