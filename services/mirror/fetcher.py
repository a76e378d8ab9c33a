"""The fetch worker: one mirror command in, a Koji build in the repository out.

For a build it asks Koji what the build is and which RPMs it has, downloads the
binary, ``-debuginfo`` and ``-debugsource`` RPMs of the configured architectures
(plus noarch), checks each against Koji's record from the file's own bytes,
places it atomically with the importer of ``retrace-mirror import`` (which also
indexes its build-ids), links noarch packages into each architecture, refreshes
the repository metadata and announces the build.  Doing the same build twice
changes nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from schemas.messages import BuildSyncedV1, MirrorAction, MirrorBuildV1
from schemas.topology import BUILD_SYNCED
from services.common.bus import Publish
from services.common.data.mirror import MirrorData, Nevra, Package, SyncState
from services.common.rpm import os_release_of
from services.common.runner import run
from services.common.settings import MirrorSettings
from services.mirror.importer import import_rpm
from services.mirror.koji import BuildState, KojiBuildInfo, KojiHub, KojiRpm, KojiUnavailable
from services.mirror.repo import link, relative_path, update_metadata
from services.mirror.verify import NotAnRpm, PayloadDigest

log = logging.getLogger(__name__)

CHUNK = 1 << 20
INCOMING = ".incoming"
"""Folder of the repository where downloads are written before they are checked."""


class BadDownload(Exception):
    """A download that is not the file Koji recorded: not an RPM (an error page served
    with 200), cut short, of another size, or failing its payload hash or signature.
    Nothing of it is placed; the command is retried later (``mirror.retry_delays``),
    ``mirror.download_attempts`` times in all."""


class NotSignedYet(Exception):
    """Signatures are required and Koji has no copy signed with a configured key yet:
    not a bad download, a wait (Koji signs builds when they are tagged for release)."""


class UnknownBuild(Exception):
    """Koji has no such build: the command can never succeed."""


@dataclass(frozen=True)
class Synced:
    """What one command did."""

    build: KojiBuildInfo | None
    action: SyncState
    reason: str | None = None
    event: BuildSyncedV1 | None = None


class Fetcher:
    """Carries out mirror commands against Koji, the repository and the store."""

    def __init__(
        self,
        data: MirrorData,
        repo: Path,
        settings: MirrorSettings,
        koji: KojiHub,
        publish: Publish,
        http: requests.Session | None = None,
        gpg_keys: Sequence[Path] = (),
    ) -> None:
        self._data = data
        self._repo = repo
        self._settings = settings
        self._koji = koji
        self._publish = publish
        self._http = http or requests.Session()
        self._gpg_keys = tuple(gpg_keys)
        self._keyring: Path | None = None

    # -- the command ------------------------------------------------------------

    def handle(self, command: MirrorBuildV1) -> Synced:
        """Carry out one command.

        Raises :class:`KojiUnavailable`, :class:`NotSignedYet` or :class:`BadDownload`
        when trying again later may succeed; :class:`UnknownBuild`, :class:`KojiError`,
        :class:`~services.common.data.mirror.PackageConflict` or
        :class:`~services.common.rpm.RpmError` when it never will.
        """
        build = self._koji.build(command.build)
        if build is None:
            raise UnknownBuild(f"Koji has no build {command.build!r}")
        if command.action == MirrorAction.REMOVE:
            return self.remove(build)
        return self.mirror(build)

    def _skip(self, build: KojiBuildInfo, release: str | None, reason: str) -> Synced:
        log.info("skipping build %s (%d): %s", build.nvr, build.id, reason)
        known = self._data.get_build(build.id)
        # A build once mirrored stays recorded as such: a later skip says nothing new.
        if known is None or known.state != SyncState.MIRRORED:
            self._data.record_build(
                build.id, build.nvr, release, SyncState.SKIPPED, reason, build.completed_at
            )
        return Synced(build, SyncState.SKIPPED, reason)

    def os_release(self, build: KojiBuildInfo) -> str | None:
        """The OS release a build belongs to: a configured Koji tag's, else its dist tag's."""
        if self._settings.tag_releases:
            for tag in self._koji.tags_of(build.id):
                if tag in self._settings.tag_releases:
                    return self._settings.tag_releases[tag]
        return os_release_of(build.release)

    def wanted(self, name: str) -> bool:
        """Whether the package filter takes builds of source package ``name``."""
        return not self._settings.packages or name in self._settings.packages

    def mirror(self, build: KojiBuildInfo) -> Synced:
        """Mirror every wanted RPM of ``build``; skip (with a logged reason) what is not wanted."""
        if build.state != BuildState.COMPLETE:
            return self._skip(build, None, f"its state is {build.state.name}, not COMPLETE")
        if not self.wanted(build.name):
            return self._skip(build, None, "its package is not in mirror.packages")
        types = self._koji.build_types(build.id)
        if "rpm" not in types:
            kinds = ", ".join(sorted(types)) or "none"
            return self._skip(build, None, f"it is not an RPM build (types: {kinds})")
        release = self.os_release(build)
        if release is None:
            return self._skip(
                build, None, f"no dist tag in {build.release!r} and no configured tag names one"
            )
        if self._settings.releases and release not in self._settings.releases:
            return self._skip(build, release, f"{release} is not in mirror.releases")
        arches = set(self._settings.arches) | {"noarch"}
        rpms = [r for r in self._koji.rpms(build.id) if r.arch in arches]
        signed = self._koji.signatures([r.id for r in rpms]) if self._settings.sigkeys else {}
        placed: list[Package] = []
        new_files = 0
        touched: set[str] = set()
        for rpm in rpms:
            package, new = self._mirror_rpm(build, rpm, release, signed.get(rpm.id, set()))
            placed.append(package)
            new_files += int(new)
            touched |= self._link_noarch(package, release) if rpm.arch == "noarch" else set()
            touched.add(rpm.arch)
        touched.discard("noarch")
        known = self._data.get_build(build.id)
        # An earlier attempt may have placed files and failed before the metadata: only a
        # build already recorded as mirrored, with nothing new, can skip createrepo_c.
        settled = new_files == 0 and known is not None and known.state == SyncState.MIRRORED
        for arch in sorted(touched):
            folder = self._repo / release / arch
            if not settled or not (folder / "repodata" / "repomd.xml").exists():
                update_metadata(folder, self._settings.createrepo_workers)
        self._data.record_build(
            build.id,
            build.nvr,
            release,
            SyncState.MIRRORED,
            None,
            build.completed_at,
            [p.id for p in placed],
        )
        event = BuildSyncedV1(
            build_id=build.id,
            nvr=build.nvr,
            os_release=release,
            packages=tuple(str(p.nevra) for p in placed),
            new_files=new_files,
        )
        self._publish(BUILD_SYNCED, event, None)
        log.info(
            "mirrored build %s (%d) for %s: %d RPMs, %d new",
            build.nvr,
            build.id,
            release,
            len(placed),
            new_files,
        )
        return Synced(build, SyncState.MIRRORED, None, event)

    def _link_noarch(self, package: Package, release: str) -> set[str]:
        for arch in self._settings.arches:
            filename = Path(package.path).name
            link(self._repo, package.path, relative_path(release, arch, filename))
        return set(self._settings.arches)

    def _mirror_rpm(
        self, build: KojiBuildInfo, rpm: KojiRpm, release: str, sigkeys: set[str]
    ) -> tuple[Package, bool]:
        nevra = Nevra(rpm.name, rpm.epoch or 0, rpm.version, rpm.release, rpm.arch)
        have = self._data.find_package(nevra, release)
        if have is not None and (self._repo / have.path).exists():
            return have, False
        # Koji writes signing keys in lower case, in its records and in its paths.
        sigkey = next((k.lower() for k in self._settings.sigkeys if k.lower() in sigkeys), None)
        url = self._koji.rpm_url(build, rpm, sigkey)
        staged = self._download(url, rpm, signed=sigkey is not None)
        try:
            done = import_rpm(self._data, self._repo, staged, release)
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)
        return done.package, True

    # -- downloads --------------------------------------------------------------

    def _download(self, url: str, rpm: KojiRpm, signed: bool) -> Path:
        """Download ``url`` into the repository's incoming folder and check it against
        Koji's record; raise :class:`BadDownload` (nothing kept) unless it matches."""
        # A folder of its own, so the checked file keeps its real name for the importer.
        folder = self._repo / INCOMING / uuid.uuid4().hex
        folder.mkdir(parents=True)
        part = folder / f"{rpm.filename}.part"
        digest = PayloadDigest()
        served_as = "no Content-Type"
        try:
            try:
                with self._http.get(url, stream=True, timeout=self._koji.timeout) as answer:
                    if answer.status_code == 404:
                        raise BadDownload(f"{url}: Koji's file server has no such file (404)")
                    if answer.status_code >= 400:
                        raise KojiUnavailable(f"{url}: HTTP {answer.status_code}")
                    served_as = answer.headers.get("Content-Type", served_as)
                    with part.open("wb") as out:
                        for chunk in answer.iter_content(CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                        out.flush()
                        os.fsync(out.fileno())
            except NotAnRpm as exc:
                # Seen in the first bytes: an error page served with 200, say.
                raise BadDownload(f"{url} is not an RPM ({served_as}): {exc}; not placed") from exc
            except (
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ) as exc:
                # The connection broke inside the body: fewer bytes than announced.
                raise BadDownload(f"{url} was cut short: {exc}") from exc
            except requests.RequestException as exc:
                raise KojiUnavailable(f"downloading {url} failed: {exc}") from exc
            try:
                payloadhash = digest.hexdigest()
            except NotAnRpm as exc:
                raise BadDownload(f"{url} is not an RPM ({served_as}): {exc}; not placed") from exc
            if not signed and digest.size != rpm.size:
                raise BadDownload(
                    f"{url}: {digest.size} bytes where Koji recorded {rpm.size}; not placed"
                )
            if payloadhash != rpm.payloadhash:
                raise BadDownload(
                    f"{url}: payload hash {payloadhash} where Koji recorded {rpm.payloadhash}; "
                    "not placed"
                )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        checked = folder / rpm.filename
        part.replace(checked)
        if self._gpg_keys:
            try:
                self._check_signature(checked, url, signed)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        return checked

    def _keyring_db(self) -> str:
        # A private RPM database holding only the configured keys, never the host's;
        # in the incoming folder, which the worker empties at start.
        if self._keyring is None:
            incoming = self._repo / INCOMING
            incoming.mkdir(parents=True, exist_ok=True)
            keyring = Path(tempfile.mkdtemp(prefix="keyring-", dir=incoming))
            for key in self._gpg_keys:
                run(["rpmkeys", "--dbpath", str(keyring), "--import", str(key)], timeout=60)
            self._keyring = keyring
        return str(self._keyring)

    def _check_signature(self, path: Path, url: str, signed: bool) -> None:
        """``rpmkeys --checksig`` against the configured keys only (a private keyring).

        ``signed`` says whether ``url`` is a copy Koji holds as signed with a configured
        key: if not, a missing signature means Koji has not signed it yet.
        """
        result = run(
            ["rpmkeys", "--dbpath", self._keyring_db(), "--checksig", str(path)],
            timeout=120,
            check=False,
        )
        # An unsigned package passes --checksig with "digests OK": require a signature.
        if result.returncode != 0 or "signatures OK" not in result.stdout:
            problem = (
                f"{url} is not signed with a configured key: "
                f"{(result.stdout + result.stderr).strip()}"
            )
            raise BadDownload(problem) if signed else NotSignedYet(problem)

    # -- removal ----------------------------------------------------------------

    def remove(self, build: KojiBuildInfo) -> Synced:
        """Remove a build's packages from the repository and the index, where configured."""
        if not self._settings.delete_on_deleted:
            return Synced(
                build, SyncState.SKIPPED, "mirror.delete_on_deleted is off: every version stays"
            )
        known = self._data.get_build(build.id)
        if known is None or known.os_release is None:
            return Synced(build, SyncState.SKIPPED, "the mirror never held it")
        release = known.os_release
        removed = self._data.build_packages(build.id)
        touched: set[str] = set()
        for package in removed:
            filename = Path(package.path).name
            if package.nevra.arch == "noarch":
                for arch in self._settings.arches:
                    (self._repo / relative_path(release, arch, filename)).unlink(missing_ok=True)
                    touched.add(arch)
            else:
                touched.add(package.nevra.arch)
            (self._repo / package.path).unlink(missing_ok=True)
            self._data.remove_package(package.id)
        for arch in sorted(touched):
            update_metadata(self._repo / release / arch, self._settings.createrepo_workers)
        self._data.record_build(build.id, build.nvr, release, SyncState.REMOVED, "deleted in Koji")
        event = BuildSyncedV1(
            build_id=build.id,
            nvr=build.nvr,
            os_release=release,
            action=MirrorAction.REMOVE,
            packages=tuple(str(p.nevra) for p in removed),
        )
        self._publish(BUILD_SYNCED, event, None)
        log.info("removed build %s (%d): %d RPMs", build.nvr, build.id, len(removed))
        return Synced(build, SyncState.REMOVED, None, event)
