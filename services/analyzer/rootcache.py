"""Step 3: a root for gdb, assembled from RPMs unpacked once into a local cache.

Each RPM is unpacked once, into ``<cache>/rpms/<sha256>/``, keyed by its content.
A task's root is then a tree of hard links into those folders: nothing is
decompressed twice.  Roots are kept too, under ``<cache>/roots/<key>/``, keyed by
the ordered digests of their packages: gdb only ever reads a root (the sandbox
mounts it read-only), so a package set seen before is served by the same tree.

The cache has a size bound.  A task holds a shared lock on each entry it uses
(:meth:`RootCache.lease`); beyond the bound, the least recently used entries that
no task holds are removed.  Every process on the host follows the same locks.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from services.common.runner import pipe
from services.common.store import Package

log = logging.getLogger(__name__)

UNPACK_TIMEOUT = 600
UNPACK_WORKERS = 2 * (os.cpu_count() or 1)
COMPLETE = ".complete"
SIZE = ".size"
WARNINGS = ".warnings"
PACKAGES = ".packages"


class RootCache:
    """Unpacked RPMs on this host, shared by every analyzer process here."""

    def __init__(self, cache_dir: Path, repo: Path, max_bytes: int | None = None) -> None:
        self._rpms = cache_dir / "rpms"
        self._roots = cache_dir / "roots"
        self._repo = repo
        self._max_bytes = max_bytes
        self._rpms.mkdir(parents=True, exist_ok=True)
        self._roots.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def lease(self, packages: list[Package]) -> Iterator[None]:
        """Hold ``packages``' entries in use: eviction skips them until the block ends."""
        handles = []
        try:
            for key in sorted({p.sha256 for p in packages}):
                handle = (self._rpms / f".{key}.use").open("a")
                handles.append(handle)
                fcntl.flock(handle, fcntl.LOCK_SH)
            yield
        finally:
            for handle in handles:
                handle.close()

    def size(self) -> int:
        """Bytes held by the complete entries, as measured when each was unpacked."""
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for entry in self._rpms.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                used = (entry / COMPLETE).stat().st_mtime
                size = int((entry / SIZE).read_text())
            except (OSError, ValueError):
                continue
            entries.append((used, size, entry))
        return sorted(entries)

    def evict(self) -> list[str]:
        """Remove least recently used entries no task holds until the cache fits its bound.

        Returns the removed entries' keys.
        """
        if self._max_bytes is None:
            return []
        removed: list[str] = []
        with (self._rpms / ".evict.lock").open("w") as evicting:
            fcntl.flock(evicting, fcntl.LOCK_EX)
            entries = self._entries()
            total = sum(size for _, size, _ in entries)
            for _, size, entry in entries:
                if total <= self._max_bytes:
                    break
                with (self._rpms / f".{entry.name}.use").open("a") as use:
                    try:
                        fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a running task uses it
                    doomed = self._rpms / f".evicted-{entry.name}"
                    shutil.rmtree(doomed, ignore_errors=True)
                    entry.replace(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                self._drop_roots_with(entry.name)
                total -= size
                removed.append(entry.name)
        for key in removed:
            log.info("evicted %s from the root cache", key)
        return removed

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
            (final / COMPLETE).touch()  # its last use, for eviction
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
                (staging / SIZE).write_text(str(_tree_size(tree)))
                (staging / COMPLETE).touch()
                if final.exists():  # left by an interrupted unpack
                    shutil.rmtree(final)
                staging.replace(final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return final, True

    def _drop_roots_with(self, key: str) -> None:
        for kept in self._roots.iterdir():
            try:
                keys = (kept / PACKAGES).read_text().split()
            except OSError:
                continue
            if key in keys:
                doomed = self._roots / f".evicted-{kept.name}"
                shutil.rmtree(doomed, ignore_errors=True)
                kept.replace(doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    def assemble(self, packages: list[Package], root: Path) -> list[str]:
        """Make ``root`` (which must not exist) the root of ``packages``; return warnings.

        ``root`` becomes a link to the kept root of this package set, built now from
        hard links into the unpacked packages unless it was built before.  A path
        two packages both ship comes from the first in ``packages``.  Hold a
        :meth:`lease` on ``packages`` while the root is in use.
        """
        keys = [p.sha256 for p in packages]
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        kept = self._roots / name
        if not (kept / COMPLETE).exists():
            with self._locked(f"root-{name}"):
                if not (kept / COMPLETE).exists():
                    self._build_root(packages, kept)
        (kept / COMPLETE).touch()
        root.parent.mkdir(parents=True, exist_ok=True)
        root.symlink_to(kept / "tree")
        return (kept / WARNINGS).read_text().splitlines()

    def _build_root(self, packages: list[Package], kept: Path) -> None:
        staging = Path(tempfile.mkdtemp(prefix=".root-", dir=self._roots))
        try:
            warnings = self._link_packages(packages, staging / "tree")
            (staging / WARNINGS).write_text("".join(f"{w}\n" for w in warnings))
            (staging / PACKAGES).write_text("".join(f"{p.sha256}\n" for p in packages))
            (staging / COMPLETE).touch()
            if kept.exists():  # left by an interrupted build
                shutil.rmtree(kept)
            staging.replace(kept)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _link_packages(self, packages: list[Package], root: Path) -> list[str]:
        warnings: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        # Unpacking is one decompressor per RPM: run them side by side.
        with ThreadPoolExecutor(max_workers=UNPACK_WORKERS) as pool:
            trees = list(pool.map(self.unpacked, packages))
        unpacked_any = any(fresh for _, fresh in trees)
        for package, (tree, _) in zip(packages, trees, strict=True):
            _link_tree(tree / "tree", root, warnings, str(package.nevra))
        if unpacked_any:
            self.evict()
        return warnings


def _tree_size(tree: Path) -> int:
    total = 0
    pending = [str(tree)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_size
    return total


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
    # A hot path when a package set is first seen: plain strings and scandir entries,
    # so each file costs one link and no extra stat.
    real_root = Path(os.path.realpath(root))
    pending = [(str(source), str(root), "")]
    while pending:
        src_dir, dst_dir, rel = pending.pop()
        # A folder may be reached through a link another package made (lib64 → usr/lib64);
        # it must still lead somewhere inside the root.
        if not _inside(real_root, Path(dst_dir)):
            warnings.append(f"{origin}: /{rel} leads outside the root; skipped")
            continue
        os.makedirs(dst_dir, exist_ok=True)  # noqa: PTH103 -- strings on this hot path
        with os.scandir(src_dir) as entries:
            for entry in entries:
                dst = os.path.join(dst_dir, entry.name)  # noqa: PTH118
                if entry.is_symlink():
                    if not os.path.lexists(dst):
                        target = _within(root, Path(dst), Path(entry.path).readlink())
                        os.symlink(target, dst)  # noqa: PTH211
                elif entry.is_dir():
                    pending.append((entry.path, dst, f"{rel}/{entry.name}".lstrip("/")))
                elif not os.path.lexists(dst):
                    os.link(entry.path, dst, follow_symlinks=False)
