"""Leases on uploads in flight, so that a dead intake worker leaves nothing behind.

Intakes on several hosts share the spool and the ``uploads`` table.  Each upload's row
names the spool folder it fills and the worker receiving it (host, pid), with a lease
that worker renews every :data:`RENEW_SECONDS` from a thread of its own, whatever the
client's pace.  A row whose lease has not been renewed for :data:`LEASE_SECONDS` belongs
to a worker that is gone (killed, its host down): any live worker's sweep, or
``retrace-intake cleanup``, deletes the row (guarded by the lease still being expired)
and then the partial folder, unless a task owns it by then.  A live worker's uploads
are renewed and never swept.  When gunicorn's master sees one of its workers die, it
lets that worker's uploads go at once (:func:`release_dead_worker`).

The clocks of the hosts sharing the store are assumed to agree within a few seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime, timedelta

from services.common.data.db import Database
from services.common.data.intake import IntakeData
from services.common.spool import Spool

log = logging.getLogger(__name__)

LEASE_SECONDS = 20.0
"""An upload whose lease was not renewed for this long is its dead worker's leftover."""

RENEW_SECONDS = 5.0
"""How often a worker renews its uploads' leases and sweeps expired ones."""


def this_worker() -> tuple[str, int]:
    """(host, pid) of this process, as its uploads' rows name it."""
    return socket.gethostname()[:255], os.getpid()


def release(data: IntakeData, spool: Spool, upload_id: str, task_id: str | None) -> None:
    """Remove an abandoned upload's partial folder, unless a task owns it (an upload
    that got as far as recording its task leaves it to cleanup's stuck-task pass)."""
    if task_id and data.get_task(task_id) is None:
        spool.remove(task_id)
    log.info("released upload %s (folder %s) of a dead intake worker", upload_id, task_id)


def sweep_expired(
    data: IntakeData, spool: Spool, lease_seconds: float = LEASE_SECONDS
) -> list[str]:
    """Let go of every upload whose lease expired; the ids of those let go."""
    cutoff = datetime.now(UTC) - timedelta(seconds=lease_seconds)
    released = []
    for upload_id, task_id in data.uploads_to_release(cutoff):
        # Guarded: a worker that renewed the lease meanwhile keeps its upload.
        if data.release_upload(upload_id, expired_before=cutoff):
            release(data, spool, upload_id, task_id)
            released.append(upload_id)
    return released


class Leases:
    """This worker's side: record uploads with a lease, renew it, sweep the dead's."""

    def __init__(
        self,
        data: IntakeData,
        spool: Spool,
        holder: tuple[str, int] | None = None,
        lease_seconds: float = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
    ) -> None:
        self._data = data
        self._spool = spool
        self._holder = holder
        self.lease_seconds = lease_seconds
        self._renew_seconds = renew_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> tuple[str, int]:
        """(host, pid) of the worker; read when asked, so a forked process names itself."""
        return self._holder or this_worker()

    def begin(self, upload_id: str, client: str, task_id: str, since: datetime) -> int:
        """Record an upload into the spool folder ``task_id`` under this worker's lease;
        return how many uploads ``client`` has in flight, this one included (uploads
        without a lease, from before leases, count if begun after ``since``)."""
        lease_since = datetime.now(UTC) - timedelta(seconds=self.lease_seconds)
        return self._data.begin_leased_upload(
            upload_id, client, task_id, self.holder, lease_since, since
        )

    def tick(self) -> None:
        """Renew this worker's leases, then sweep the expired ones of dead workers."""
        self._data.renew_uploads(self.holder)
        sweep_expired(self._data, self._spool, self.lease_seconds)

    def start(self) -> None:
        """Renew and sweep every ``renew_seconds`` from a daemon thread, until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upload-leases", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread (the leases then expire unless another worker takes over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.warning("upload leases: the store did not answer", exc_info=True)
            if self._stop.wait(self._renew_seconds):
                return


def release_dead_worker(pid: int) -> list[str]:
    """In gunicorn's master, when worker ``pid`` died: let its uploads go at once.

    Never raises: a master must outlive any trouble here (the lease sweep of the
    other workers is the second line)."""
    try:
        from services.common.settings import IntakeConfig, load_settings  # noqa: PLC0415 -- master only

        settings = load_settings(IntakeConfig)
        db = Database.from_url(settings.store_url)
        data = IntakeData(db)
        try:
            spool = Spool(settings.spool)
            released = []
            for upload_id, task_id in data.uploads_to_release(
                datetime.now(UTC), holder=(this_worker()[0], pid)
            ):
                if data.release_upload(upload_id):
                    release(data, spool, upload_id, task_id)
                    released.append(upload_id)
            return released
        finally:
            db.dispose()
    except Exception:
        log.warning("could not release the uploads of worker %s", pid, exc_info=True)
        return []
