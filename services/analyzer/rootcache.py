"""Step 3: a root for gdb, assembled from RPMs unpacked once into a local cache.

Each RPM is unpacked once, into ``<cache>/rpms/<sha256>/``, keyed by its content.
A task's root is then a tree of hard links into those folders: nothing is
decompressed twice, and assembling a root seen before costs only the links.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.common.runner import pipe
from services.common.store import Package

log = logging.getLogger(__name__)

UNPACK_TIMEOUT = 600
COMPLETE = ".complete"


class RootCache:
    """Unpacked RPMs on this host, shared by every analyzer process here."""

    def __init__(self, cache_dir: Path, repo: Path) -> None:
        self._rpms = cache_dir / "rpms"
        self._repo = repo
        self._rpms.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with (self._rpms / f".{key}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def unpacked(self, package: Package) -> tuple[Path, bool]:
        """The folder holding ``package``'s files, unpacking it if needed.

        Returns the folder and whether this call unpacked it.  Two processes
        asking at once unpack it once: the second waits for the first's lock.
        """
        final = self._rpms / package.sha256
        if (final / COMPLETE).exists():
            return final, False
        with self._locked(package.sha256):
            if (final / COMPLETE).exists():
                return final, False
            staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=self._rpms))
            try:
                tree = staging / "tree"
                tree.mkdir()
                pipe(
                    ["rpm2cpio", str(self._repo / package.path)],
                    ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
                    timeout=UNPACK_TIMEOUT,
                    cwd=tree,
                )
                (staging / COMPLETE).touch()
                if final.exists():  # left by an interrupted unpack
                    shutil.rmtree(final)
                staging.replace(final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return final, True

    def assemble(self, packages: list[Package], root: Path) -> list[str]:
        """Build ``root`` from ``packages`` with hard links; return warnings for the log.

        A path two packages both ship comes from the first in ``packages``.
        """
        warnings: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        for package in packages:
            tree, _ = self.unpacked(package)
            _link_tree(tree / "tree", root, warnings, str(package.nevra))
        return warnings


def _inside(root: Path, path: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root) + os.sep)


def _within(root: Path, link: Path, target: Path) -> Path:
    # An absolute link means a path of the crashed machine; left absolute it would
    # lead gdb to the analyzer host's own file of that name.
    if not target.is_absolute():
        return target
    return Path(os.path.relpath(root / target.relative_to("/"), link.parent))


def _link_tree(source: Path, root: Path, warnings: list[str], origin: str) -> None:
    real_root = Path(os.path.realpath(root))
    for dirpath, dirnames, filenames in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        target_dir = root / rel
        # A folder may be reached through a link another package made (lib64 → usr/lib64);
        # it must still lead somewhere inside the root.
        if not _inside(real_root, target_dir):
            warnings.append(f"{origin}: /{rel} leads outside the root; skipped")
            dirnames.clear()
            continue
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in [*dirnames, *filenames]:
            src = Path(dirpath) / name
            dst = target_dir / name
            if src.is_symlink():
                if not dst.is_symlink() and not dst.exists():
                    dst.symlink_to(_within(root, dst, src.readlink()))
                if name in dirnames:
                    dirnames.remove(name)  # its content is walked through its own package
            elif name in filenames and not dst.exists() and not dst.is_symlink():
                os.link(src, dst, follow_symlinks=False)
