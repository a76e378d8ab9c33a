"""The client's settings file: ``$XDG_CONFIG_HOME/retrace-client/client.toml``.

Every key is optional::

    minimal = true             # send minimal cores unless --no-minimal
    red_zone = 4096            # bytes kept below each thread's stack pointer
    max_anonymous_kib = 64     # anonymous mappings up to this size are kept whole
    blank_environment = true   # zero the environment strings of minimal cores
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from client.errors import ClientError
from client.minicore import DEFAULT_MAX_ANONYMOUS, DEFAULT_RED_ZONE, KIB


def default_path() -> Path:
    """``$RETRACE_CLIENT_CONFIG``, else ``$XDG_CONFIG_HOME/retrace-client/client.toml``."""
    named = os.environ.get("RETRACE_CLIENT_CONFIG")
    if named:
        return Path(named)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "retrace-client" / "client.toml"


@dataclass(frozen=True)
class Settings:
    """What the settings file says, with the defaults for what it does not."""

    minimal: bool = False
    red_zone: int = DEFAULT_RED_ZONE
    max_anonymous_kib: int = DEFAULT_MAX_ANONYMOUS // KIB
    blank_environment: bool = False


def load(path: Path | None = None) -> Settings:
    """The settings in ``path`` (default: :func:`default_path`); defaults if it is absent."""
    path = path or default_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ClientError(f"cannot read the settings file {path}: {exc}") from exc
    types = {f.name: type(getattr(Settings(), f.name)) for f in fields(Settings)}
    for key, value in raw.items():
        wanted = types.get(key)
        if wanted is None:
            raise ClientError(f"{path}: unknown setting {key!r} (known: {', '.join(types)})")
        if type(value) is not wanted or (wanted is int and value < 0):
            kind = "true or false" if wanted is bool else "a number, 0 or more"
            raise ClientError(f"{path}: {key} must be {kind}")
    return Settings(**raw)
