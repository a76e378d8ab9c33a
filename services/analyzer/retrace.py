"""The retrace of one crash, step by step: core → packages → root → gdb."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from schemas.messages import MirrorBuildV1
from services.analyzer.coredump import (
    CoreError,
    MinimalCore,
    Module,
    check_complete,
    minimal_note,
    read_modules,
)
from services.analyzer.debugshell import write_manifest
from services.analyzer.gdb import MAX_FRAMES, GdbError, GdbResult, gdb_version, run_gdb
from services.analyzer.packages import Finder, Resolution
from services.analyzer.rootcache import RootCache
from services.analyzer.sandbox import Sandbox, SandboxMode
from services.analyzer.tasklog import TaskLog
from services.analyzer.unpack import PayloadError, shown
from services.common import progress
from services.common.data.mirror import MirrorData, Package
from services.common.elf import NotACore, core_arch
from services.common.settings import AnalyzerSettings


class RetraceFailure(Exception):
    """The crash cannot be retraced; the message is the one sentence the user reads."""


class WaitForBuild(Exception):
    """The crashed package's build ``nvr`` is not mirrored: ask the mirror, retry later."""

    def __init__(self, nvr: str) -> None:
        super().__init__(nvr)
        self.nvr = nvr


@dataclass(frozen=True)
class Retrace:
    """The outcome of a successful retrace."""

    gdb: GdbResult
    resolution: Resolution


@dataclass(frozen=True)
class Job:
    """Everything one retrace attempt works with."""

    crash_dir: Path
    work_dir: Path
    index: MirrorData
    cache: RootCache
    settings: AnalyzerSettings
    log: TaskLog
    set_progress: Callable[[str], None]
    # Where a debug task keeps its exact package set (None for other tasks).
    manifest: Path | None = None
    # How many times the task has asked the mirror for its crashed build.
    fetch_attempt: int = 0


def retrace(job: Job) -> Retrace:
    """Retrace the crash in ``job.crash_dir``; raise :class:`RetraceFailure` saying why not,
    or :class:`WaitForBuild` to wait for the mirror to fetch the crashed build."""
    core = job.crash_dir / "coredump"
    executable = (job.crash_dir / "executable").read_text(encoding="utf-8").strip()
    job.set_progress(progress.ANALYZE)
    arch, modules = read_core(job, core, executable)
    finder = Finder(job.index, job.cache, arch, job.crash_dir)
    resolution = find_packages(job, finder, modules)
    check_crashed_build(job, finder, resolution)
    job.set_progress(progress.INIT)
    root = job.work_dir / "root"
    with ExitStack() as leases:
        leases.enter_context(job.cache.lease(resolution.packages))
        # Runs before the leases go, however the retrace ends.
        leases.callback(lambda: job.cache.settle(finder.pending))
        shared = find_shared_dwarf(job, finder, resolution)
        if shared:
            leases.enter_context(job.cache.lease(shared))
        if job.manifest is not None:
            write_manifest(
                job.manifest, executable, arch, resolution.packages, resolution.only_by_digest()
            )
            job.log.add(
                f"The package set is kept for 'retrace-analyzer shell' in {job.manifest.name}"
            )
        prepare_root(job, resolution, root)
        exe_in_root = root / executable.lstrip("/")
        if not exe_in_root.is_file():
            raise RetraceFailure(f"The executable {executable} is in none of the core's packages.")
        job.set_progress(progress.BACKTRACE)
        result = generate_backtrace(job, root, executable, core)
        job.set_progress(progress.CLEANUP)
    return Retrace(gdb=result, resolution=resolution)


def read_core(job: Job, core: Path, executable: str) -> tuple[str, list[Module]]:
    """Step 1: the core's architecture and modules."""
    with job.log.step("Reading the core dump"):
        try:
            arch = core_arch(core)
        except NotACore as exc:
            raise RetraceFailure(f"The core dump is not usable: {exc}.") from exc
        if arch not in job.settings.arches:
            raise RetraceFailure(
                f"The core dump is for {arch}, which this analyzer does not retrace."
            )
        try:
            check_complete(core)
            modules = read_modules(core, sandbox_for(job.settings))
        except CoreError as exc:
            raise RetraceFailure(f"{_sentence(str(exc))}.") from exc
        job.log.add(f"{len(modules)} modules, architecture {arch}")
        try:
            minimal = minimal_note(core)
        except CoreError as exc:
            job.log.warn(f"{exc}; the core is read as it is")
        else:
            if minimal is not None:
                log_minimal(job, minimal, core.stat().st_size)
    if not any(m.build_id for m in modules if not m.is_vdso):
        raise RetraceFailure("The core dump carries no build-ids, so no package can be matched.")
    if executable not in {m.name for m in modules}:
        raise RetraceFailure(
            f"The core dump does not contain the executable {executable}: "
            "it was not written by that program."
        )
    return arch, modules


MAX_DROPPED_LINES = 32


def log_minimal(job: Job, minimal: MinimalCore, size: int) -> None:
    """Say that the core is minimal (``retrace-client --minimal``) and what it lacks."""
    lacking = sum(d.end - d.start for d in minimal.dropped)
    job.log.add(
        f"The core is minimal (retrace-client --minimal): {size} of {minimal.full_size} bytes; "
        f"it lacks {len(minimal.dropped)} ranges of memory ({lacking} bytes; the client drops "
        f"anonymous mappings over {minimal.max_anonymous} bytes and each stack below its "
        f"pointer minus {minimal.red_zone} bytes). Values there print as "
        "'<error: Cannot access memory at address ...>'."
    )
    for dropped in minimal.dropped[:MAX_DROPPED_LINES]:
        job.log.add(f"  lacks {dropped.start:#x}-{dropped.end:#x}: {dropped.why}")
    if len(minimal.dropped) > MAX_DROPPED_LINES:
        job.log.add(f"  and {len(minimal.dropped) - MAX_DROPPED_LINES} more ranges")
    if minimal.environment_blanked:
        job.log.add("The client blanked the environment strings")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def find_packages(job: Job, finder: Finder, modules: list[Module]) -> Resolution:
    """Step 2: the packages that serve the core's modules (services/analyzer/packages.py),
    each module's line saying which step found its binary and its debuginfo."""
    with job.log.step("Finding packages"):
        try:
            resolution = finder.find(modules)
        except PayloadError as exc:
            raise RetraceFailure(f"A package could not be read: {exc}.") from exc
        if finder.declared_release:
            job.log.add(f"The crash declares the release {finder.declared_release}")
        for served in resolution.served:
            module = served.module
            if module.is_vdso:
                job.log.add(f"  {module.name}: the kernel's vDSO, no package needed")
                continue
            binary = str(served.binary.nevra) if served.binary else "NOT FOUND"
            debug = str(served.debug.nevra) if served.debug else "NOT FOUND"
            how = [f"binary {served.binary_how}"] if served.binary else []
            how += [f"debuginfo {served.debug_how}"] if served.debug else []
            build_id = module.build_id or "no build-id"
            found = f"; found: {', '.join(how)}" if how else ""
            job.log.add(f"  {module.name} [{build_id}]: {binary}, debuginfo {debug}{found}")
        for note in resolution.notes:
            job.log.warn(note)
        for module in resolution.missing_debug:
            job.log.warn(f"no debuginfo for {module.name} ({module.build_id})")
    if not resolution.packages:
        raise RetraceFailure("None of the core's build-ids is in the mirror's index.")
    return resolution


def check_crashed_build(job: Job, finder: Finder, resolution: Resolution) -> None:
    """Step 2b: when the crashed package's own build is not mirrored, wait for it.

    The ``package`` file may name the package or its build (``foo-4.2-3.fc40`` for
    ``foo-cli``): either counts.  Raises :class:`WaitForBuild` (the analyzer asks
    the mirror for the build by NVR and retries the task later) until the task has
    asked ``fetch_attempts`` times; then the retrace goes on with what is
    available, and the log says what is missing.
    """
    crashed = finder.crashed_build
    if crashed is None:
        return
    nvr = str(crashed)
    if resolution.has_build(crashed):
        if job.fetch_attempt:
            job.log.add(f"The crashed package's build {nvr} was fetched by the mirror on request")
        return
    if finder.build_is_mirrored(crashed):
        job.log.warn(
            f"the crashed package {nvr} is mirrored but serves none of the core's modules; "
            "the backtrace shows what the mirror has"
        )
        return
    asked, limit = job.fetch_attempt, job.settings.fetch_attempts
    if asked < limit and _is_nvr(nvr):
        raise WaitForBuild(nvr)
    if asked:
        job.log.warn(
            f"the crashed package's build {nvr} could not be fetched: the mirror was asked "
            f"{asked} times and does not have it; the backtrace shows what the mirror has"
        )
        return
    job.log.warn(
        f"the crashed package {nvr} is not among the mirrored packages that serve this "
        "core; the backtrace shows what the mirror has"
    )


def _is_nvr(text: str) -> bool:
    try:
        MirrorBuildV1(build=text)
    except ValidationError:
        return False
    return True


def find_shared_dwarf(job: Job, finder: Finder, resolution: Resolution) -> list[Package]:
    """Step 3a: the packages of the ``.dwz`` files the debug files point to."""
    with job.log.step("Finding shared DWARF (.gnu_debugaltlink)"):
        before = {p.id for p in resolution.extra}
        try:
            report = finder.find_shared_dwarf(resolution)
        except PayloadError as exc:
            raise RetraceFailure(f"A package could not be unpacked: {exc}.") from exc
        for name, package, how in report:
            if package is None:
                job.log.warn(f"shared DWARF {name} not found: {how}")
            else:
                job.log.add(f"  {name}: {package.nevra}, found {how}")
    return [p for p in resolution.extra if p.id not in before]


def printable(path: str) -> str:
    """``path`` from a package, for one log line: undecodable bytes and control
    characters (a newline would start a line of its own) written as escapes."""
    return "".join(
        f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in shown(path)
    )


MAX_PATHS_SHOWN = 4
"""Of the files a root takes from a package, how many its log line names."""


def prepare_root(job: Job, resolution: Resolution, root: Path) -> None:
    """Step 3: the root, assembled from the unpacked-package cache."""
    with job.log.step("Preparing the root"):
        packages = resolution.packages
        try:
            for warning in job.cache.assemble(packages, root, resolution.only_by_digest()):
                job.log.warn(warning)
        except PayloadError as exc:
            raise RetraceFailure(f"A package could not be unpacked: {exc}.") from exc
        for package in packages:
            job.log.add(f"  {package.nevra} ({package.os_release})")
            only = sorted(resolution.only.get(package.id, ()))
            if only:
                names = ", ".join(printable(path) for path in only[:MAX_PATHS_SHOWN])
                more = len(only) - MAX_PATHS_SHOWN
                job.log.add(
                    f"    of which only {names}" + (f" and {more} more" if more > 0 else "")
                )


def sandbox_for(settings: AnalyzerSettings) -> Sandbox:
    """The sandbox gdb runs in, as the settings configure it."""
    return Sandbox(SandboxMode(settings.sandbox), settings.gdb_memory_mib)


def generate_backtrace(job: Job, root: Path, executable: str, core: Path) -> GdbResult:
    """Step 4: gdb's session on the core, inside the root, inside the sandbox."""
    with job.log.step("Generating backtrace"):
        job.log.add(gdb_version(job.settings.gdb))
        sandbox = sandbox_for(job.settings)
        if sandbox.mode == SandboxMode.NONE:
            job.log.warn("gdb runs unsandboxed, as this analyzer's settings choose")
        try:
            result = run_gdb(
                job.settings.gdb, sandbox, root, executable, core, job.settings.gdb_timeout
            )
        except GdbError as exc:
            raise RetraceFailure(f"gdb failed: {exc}.") from exc
        for line in result.stderr.splitlines():
            if line.strip():
                job.log.add(f"gdb: {line}")
        for thread in result.report.get("threads", []):
            if thread.get("truncated"):
                job.log.warn(
                    f"thread {thread.get('number')} has more than {MAX_FRAMES} frames; "
                    f"the backtrace shows the innermost {MAX_FRAMES}"
                )
        if not result.report:
            job.log.warn("gdb's frame report is missing: backtrace.json lists no frames")
    return result
