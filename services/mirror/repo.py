"""The repository on disk: ``<repo>/<os_release>/<arch>/Packages/<file>.rpm``.

Files are placed atomically (copied beside their final name, then renamed), so a
reader never sees a partial package and an interrupted import leaves nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from services.common.runner import run

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


def link(repo: Path, relative_source: str, relative_link: str) -> Path:
    """Hard-link ``relative_source`` at ``relative_link`` (atomically; replacing nothing else).

    A noarch package is stored once and linked into each architecture's folder: a
    hard link, because createrepo_c, dnf and debuginfod all treat it as a plain file.
    """
    source = repo / relative_source
    final = repo / relative_link
    if final.exists() and final.samefile(source):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".incoming-link-{os.getpid()}-{final.name}"
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    tmp.replace(final)
    return final


def update_metadata(folder: Path, workers: int = 2, timeout: float = 1800) -> None:
    """Bring ``folder/repodata`` up to date with the RPMs under ``folder`` (createrepo_c).

    Incremental (``--update``): unchanged packages are taken from the old metadata.
    Serialised per folder by a lock file, since two createrepo_c runs on one folder
    collide on its temporary ``.repodata``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".createrepo.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            argv = ["createrepo_c", "--quiet", "--workers", str(workers), "--excludes", ".*"]
            if (folder / "repodata" / "repomd.xml").exists():
                argv.append("--update")
            run([*argv, str(folder)], timeout=timeout)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
