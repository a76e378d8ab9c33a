"""The mirror's HTTP face (placeholder until the serving step lands)."""

from __future__ import annotations

from services.common.settings import Settings
from services.common.store import Store


def serve(settings: Settings, store: Store, bind: str, workers: int) -> int:
    """Serve the repository over HTTP."""
    del settings, store, bind, workers
    raise NotImplementedError
