"""The repository on disk: ``<repo>/<os_release>/<arch>/Packages/<file>.rpm``.

Files are placed atomically (copied beside their final name, then renamed), so a
reader never sees a partial package and an interrupted import leaves nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's content, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def relative_path(os_release: str, arch: str, filename: str) -> str:
    """Where a package lives, relative to the repository root."""
    return f"{os_release}/{arch}/Packages/{filename}"


def place(source: Path, repo: Path, relative: str) -> Path:
    """Copy ``source`` to ``repo/relative`` atomically; return the final path."""
    final = repo / relative
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=final.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        Path(tmp).replace(final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final
