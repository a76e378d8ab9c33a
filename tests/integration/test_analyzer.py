"""The analyzer's results and failures, on real cores, with the real services running.

Broken crashes are put straight into the store and the spool and their command
published straight onto the analyzer's queue, as a client could never send them
through the intake: the analyzer must stand on its own checks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.messages import AnalyzeTaskV1, TaskType
from schemas.topology import ANALYZE
from services.common.bus import Publisher
from services.common.data.intake import TaskStatus
from services.common.runner import run
from tests.data import Data
from tests.fixtures.build import Fixtures
from tests.integration.stack import BIN, Stack, pack_problem_dir, start_stack, wait_gone
from tests.integration.test_end_to_end import XZ, submit

pytestmark = pytest.mark.integration

PATCHED_BUILD_ID_NOTE = (
    bytes.fromhex("040000001400000003000000474e5500"),  # namesz 4, descsz 20, NT_GNU_BUILD_ID
    bytes.fromhex("040000001400000099000000474e5500"),  # the same note, of an unknown type
)


class Analyzer:
    """Puts a problem directory into a running stack's spool and store, as the intake would."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.store = Data.from_url(f"sqlite:///{stack.home}/var/retrace.sqlite3")
        self.spool = stack.home / "var" / "spool"

    def inject(
        self,
        problem_dir: Path,
        task_id: str,
        arch: str = "x86_64",
        task_type: TaskType = TaskType.RETRACE,
        *,
        queued: bool = True,
    ) -> str:
        crash = self.spool / task_id / "crash"
        shutil.copytree(problem_dir, crash)
        self.store.intake.create_task(task_id, "not-a-password", arch, task_type, "queued")
        if queued:
            assert self.store.intake.move_task(task_id, [TaskStatus.SUBMITTING], TaskStatus.QUEUED)
        publisher = Publisher(self.stack.broker_url)
        command = AnalyzeTaskV1(task_id=task_id, arch=arch, task_type=task_type)
        try:
            publisher.publish(ANALYZE, command, arch)
        finally:
            publisher.close()
        return task_id

    def wait(self, task_id: str, timeout: float = 120) -> TaskStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.store.intake.get_task(task_id)
            assert task is not None
            if task.status.final:
                return task.status
            time.sleep(0.3)
        raise AssertionError(f"task {task_id} did not finish\n{self.stack.logs()}")

    def result(self, task_id: str, name: str) -> str:
        """A result file of the task, from the folder its row names."""
        task = self.store.intake.get_task(task_id)
        assert task is not None
        assert task.results is not None, task
        return (self.spool / task_id / task.results / name).read_text()

    def reason(self, task_id: str) -> str:
        """The log's last line, without its time stamp."""
        return self.result(task_id, "log").strip().splitlines()[-1].split(" ", 1)[1]


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
) -> Iterator[Stack]:
    # Fetching unmirrored builds on demand is test_analyzer_fetch.py's; here it is off.
    stack = start_stack(
        tmp_path_factory.mktemp("analyzer"),
        make_broker_url(),
        crash_fixtures,
        overrides={"RETRACE_ANALYZER__FETCH_ATTEMPTS": "0"},
    )
    yield stack
    stack.down()


@pytest.fixture(scope="module")
def analyzer(stack: Stack) -> Analyzer:
    return Analyzer(stack)


@pytest.fixture
def broken(crash_fixtures: Fixtures, tmp_path: Path) -> Path:
    """A copy of the real problem directory, for a test to damage."""
    problem = tmp_path / "problem"
    shutil.copytree(crash_fixtures.crash.problem_dir, problem)
    return problem


def test_backtrace_json_names_every_frame_and_module(
    stack: Stack, analyzer: Analyzer, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    crash = crash_fixtures.crash
    task_id, password = submit(stack, crash_fixtures, tmp_path)
    assert stack.wait_finished(task_id, password) == "FINISHED_SUCCESS", stack.logs()
    report = json.loads(analyzer.result(task_id, "backtrace.json"))

    assert report["signal"] == {"number": 11, "name": crash.signal}
    crashing = [t for t in report["threads"] if t["crashing"]]
    assert len(crashing) == 1
    assert crashing[0]["number"] == report["crashing_thread"]
    assert not crashing[0]["truncated"]
    frames = crashing[0]["frames"]
    by_path = {m.path: m for m in crash.modules}
    library = by_path["/usr/lib64/libcrasher.so.1"]
    top = frames[0]
    assert top["function"] == crash.function
    assert (top["file"], top["line"]) == (crash.source_file, crash.line)
    assert top["module"] == "/usr/lib64/libcrasher.so.1"
    assert top["build_id"] == library.build_id
    assert top["symbolized"] is True
    start = next(m["start"] for m in report["modules"] if m["path"] == top["module"])
    assert int(top["offset"], 16) == int(top["address"], 16) - int(start, 16)
    assert [f["function"] for f in frames[-len(crash.frames) + 2 :]] == [
        f.function for f in crash.frames[2:]
    ]
    assert frames[-1]["module"] == crash.executable
    assert any(f["function"] == "msort_with_tmp" and f["symbolized"] for f in frames)
    assert report["crash_function"] == crash.function

    modules = {m["path"]: m for m in report["modules"]}
    glibc = crash_fixtures.rpm("glibc")
    libc = modules["/usr/lib64/libc.so.6"]
    assert libc["found"]
    assert libc["debuginfo_found"]
    assert libc["package"] == glibc.nevra
    assert libc["debuginfo_package"] == crash_fixtures.rpm("glibc-debuginfo").nevra
    vdso = next(m for m in report["modules"] if m["vdso"])
    assert vdso["package"] is None

    log = analyzer.result(task_id, "log")
    assert "GNU gdb" in log
    assert f"  {glibc.nevra} (" in log
    assert "Generating backtrace: " in log


def test_a_debug_task_keeps_its_core_and_reopens_in_an_interactive_gdb(
    stack: Stack, analyzer: Analyzer, crash_fixtures: Fixtures
) -> None:
    crash = crash_fixtures.crash
    task_id = analyzer.inject(crash.problem_dir, "debug-task", task_type=TaskType.DEBUG)
    assert analyzer.wait(task_id) == TaskStatus.SUCCESS
    task_dir = analyzer.spool / task_id
    assert (task_dir / "crash" / "coredump").is_file()
    manifest = json.loads((task_dir / "debug-manifest.json").read_text())
    by_nevra = {p["nevra"]: p for p in manifest["packages"]}
    # The root took libc's and the loader's debug files of glibc-debuginfo, and so does
    # the shell's: it opens the task's own kept root, without building another.
    assert len(by_nevra[crash_fixtures.rpm("glibc-debuginfo").nevra]["only"]) == 2
    trees = stack.home / "var/cache/analyzer/trees"
    kept = sorted(tree.name for tree in trees.iterdir())

    session = subprocess.run(
        [str(BIN / "retrace-analyzer"), "shell", task_id],
        input="bt 1\nquit\n",
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert session.returncode == 0, session.stderr
    assert f"in {crash.function} (" in session.stdout
    assert f"at {crash.source_file}:{crash.line}" in session.stdout
    assert not list((stack.home / "var/cache/analyzer/work").glob("shell-*"))
    assert sorted(tree.name for tree in trees.iterdir()) == kept


def test_shared_dwarf_in_a_dwz_file_is_found_through_gnu_debugaltlink(
    analyzer: Analyzer, crash_fixtures: Fixtures
) -> None:
    crash = crash_fixtures.extra("dwz-in-lib")
    task_id = analyzer.inject(crash.problem_dir, "dwz-in-lib")
    assert analyzer.wait(task_id) == TaskStatus.SUCCESS, analyzer.stack.logs()
    backtrace = analyzer.result(task_id, "backtrace")
    frame0 = next(line for line in backtrace.splitlines() if line.startswith("#0 "))
    assert f"in {crash.function} (" in frame0
    assert frame0.endswith(f"at {crash.source_file}:{crash.line}")
    assert "scale = 7" in backtrace  # a local, whose type dwz moved into the .dwz file
    main_debuginfo = crash_fixtures.rpm("shapes-debuginfo").nevra
    log = analyzer.result(task_id, "log")
    assert re.search(rf"\.dwz/shapes-2\.0-1\.fc40\.x86_64 \[[0-9a-f]+\]: {main_debuginfo}", log)
    assert "could not find" not in log.lower()  # gdb's words for a missing .dwz file
    assert "not found" not in log
    packages = json.loads(analyzer.result(task_id, "backtrace.json"))["packages"]
    assert main_debuginfo in packages
    assert crash_fixtures.rpm("shapes-libs-debuginfo").nevra in packages
    assert not any("debugsource" in nevra for nevra in packages)


@pytest.mark.parametrize(
    "name", ["assert-abort", "second-thread", "cxx-uncaught", "stack-overflow", "no-build-id"]
)
def test_programs_dying_the_usual_ways_are_retraced(
    analyzer: Analyzer, crash_fixtures: Fixtures, name: str
) -> None:
    crash = crash_fixtures.extra(name)
    task_id = analyzer.inject(crash.problem_dir, name)
    assert analyzer.wait(task_id) == TaskStatus.SUCCESS, analyzer.stack.logs()
    report = json.loads(analyzer.result(task_id, "backtrace.json"))
    log = analyzer.result(task_id, "log")
    backtrace = analyzer.result(task_id, "backtrace")
    assert report["signal"]["name"] == crash.signal
    (crashing,) = [t for t in report["threads"] if t["crashing"]]
    ours = [f for f in crashing["frames"] if f.get("function") == crash.function]
    assert ours, crashing["frames"][:10]
    assert ours[0]["module"] == crash.executable
    if name == "no-build-id":
        # rpm's find-debuginfo strips it yet writes no debug file for it: only its symbol
        # table is left, as on Fedora.
        assert (ours[0]["file"], ours[0]["symbolized"]) == (None, False)
    else:
        assert (crash.source_file, crash.line) in {(f["file"], f["line"]) for f in ours}
    # The package has no .build-id links: the index read the programs' own build-id
    # notes, and the one without a note was found by its path in the crash's package.
    oddities = crash_fixtures.rpm("oddities").nevra
    how = (
        f"binary in the hinted {oddities} by its path"
        if name == "no-build-id"
        else "binary by build-id"
    )
    module_line = next(line for line in log.splitlines() if f"  {crash.executable} [" in line)
    assert f": {oddities}, debuginfo " in module_line, module_line
    assert f"found: {how}" in module_line, module_line
    # Of the package's debuginfo, the root took this program's debug file alone (all
    # five crashes share the cache: each later one had its file written into the entry).
    debuginfo = crash_fixtures.rpm("oddities-debuginfo")
    taken = re.search(rf"  {re.escape(debuginfo.nevra)} \(\S+\)\n\S+ +of which only (.*)\n", log)
    if name == "no-build-id":  # no debug file is indexed for it: the package is taken whole
        assert taken is None, log
    else:
        assert taken is not None, log
        assert taken[1] == f"/usr/lib/debug{crash.executable}-{debuginfo.version}-" + (
            f"{debuginfo.release}.{debuginfo.arch}.debug"
        )
    if name == "assert-abort":
        assert "there is always a record" in backtrace  # __abort_msg
    if name == "second-thread":
        assert len(report["threads"]) == 2
        (other,) = [t for t in report["threads"] if not t["crashing"]]
        assert any(f.get("function") == "main" for f in other["frames"])
    if name == "stack-overflow":
        assert crashing["truncated"]
        assert len(crashing["frames"]) == 2048
        assert "has more than 2048 frames" in log
    else:
        assert not crashing["truncated"]


def test_a_program_of_24_libraries_with_a_100_mb_heap_is_retraced_through_the_intake(
    stack: Stack, analyzer: Analyzer, crash_fixtures: Fixtures, tmp_path: Path
) -> None:
    crash = crash_fixtures.extra("many-libs-big-heap")
    assert (crash.problem_dir / "coredump").stat().st_size > 100 << 20
    body = pack_problem_dir(crash.problem_dir, tmp_path / "crash.tar.xz").read_bytes()
    status, headers, text = stack.request("POST", "/create", body, XZ)
    assert status == 201, text
    task_id, password = headers["X-Task-Id"], headers["X-Task-Password"]
    assert stack.wait_finished(task_id, password) == "FINISHED_SUCCESS", stack.logs()
    report = json.loads(analyzer.result(task_id, "backtrace.json"))
    (crashing,) = [t for t in report["threads"] if t["crashing"]]
    top = crashing["frames"][0]
    assert (top["function"], top["file"], top["line"]) == (
        crash.function,
        crash.source_file,
        crash.line,
    )
    stages = [f["function"] for f in crashing["frames"] if f["function"].startswith("stage_")]
    assert stages == [f"stage_{n:02d}" for n in range(23, -1, -1)]
    assert all(f["symbolized"] for f in crashing["frames"])
    libraries = [m for m in report["modules"] if "/libstage" in m["path"]]
    assert len(libraries) == 24
    assert all(m["found"] and m["debuginfo_found"] for m in libraries)
    assert {m["debuginfo_package"].split("-3.0")[0] for m in libraries} == {
        "manylibs-core-debuginfo",
        "manylibs-extra-debuginfo",
        "manylibs-more-debuginfo",
    }


def test_a_command_that_overtakes_the_intakes_queued_mark_is_still_run(
    analyzer: Analyzer, crash_fixtures: Fixtures
) -> None:
    # The intake publishes, then marks the task queued; the analyzer may be quicker.
    task_id = analyzer.inject(crash_fixtures.crash.problem_dir, "overtaking", queued=False)
    assert analyzer.wait(task_id) == TaskStatus.SUCCESS


def test_an_unmirrored_crashed_build_is_named_and_the_retrace_goes_on(
    analyzer: Analyzer, broken: Path
) -> None:
    # The crash says it came from a build the mirror lacks, and this analyzer does not
    # ask the mirror for it (fetch_attempts = 0): the log says so and the retrace goes on.
    (broken / "package").write_text("crasher-1.0-2.fc40")
    task_id = analyzer.inject(broken, "unmirrored-build")
    assert analyzer.wait(task_id) == TaskStatus.SUCCESS
    log = analyzer.result(task_id, "log")
    assert "warning: the crashed package crasher-1.0-2.fc40 is not among the mirrored" in log


def test_a_truncated_core_fails_with_the_reason(analyzer: Analyzer, broken: Path) -> None:
    core = broken / "coredump"
    core.write_bytes(core.read_bytes()[: 64 * 1024])
    task_id = analyzer.inject(broken, "truncated-core")
    assert analyzer.wait(task_id) == TaskStatus.FAILURE
    assert "The core dump is truncated: it has 65536 bytes of the" in analyzer.reason(task_id)


def test_a_core_of_another_architecture_fails_before_any_work(
    analyzer: Analyzer, broken: Path
) -> None:
    core = broken / "coredump"
    data = bytearray(core.read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    core.write_bytes(bytes(data))
    task_id = analyzer.inject(broken, "aarch64-core")
    assert analyzer.wait(task_id) == TaskStatus.FAILURE
    reason = analyzer.reason(task_id)
    assert "The core dump is for aarch64, which this analyzer does not retrace." in reason
    assert "Finding packages" not in analyzer.result(task_id, "log")


def test_an_executable_the_core_does_not_contain_fails(analyzer: Analyzer, broken: Path) -> None:
    (broken / "executable").write_text("/usr/bin/not-the-crasher")
    task_id = analyzer.inject(broken, "wrong-executable")
    assert analyzer.wait(task_id) == TaskStatus.FAILURE
    assert "does not contain the executable /usr/bin/not-the-crasher" in analyzer.reason(task_id)


def test_a_core_without_build_ids_fails(analyzer: Analyzer, broken: Path) -> None:
    core = broken / "coredump"
    data = core.read_bytes()
    assert PATCHED_BUILD_ID_NOTE[0] in data
    core.write_bytes(data.replace(*PATCHED_BUILD_ID_NOTE))
    task_id = analyzer.inject(broken, "no-build-ids")
    assert analyzer.wait(task_id) == TaskStatus.FAILURE
    assert "carries no build-ids" in analyzer.reason(task_id)


def test_a_package_damaged_on_the_mirrors_disk_fails_the_task_naming_it(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
    broken: Path,
) -> None:
    # A stack of its own: the module's stack has these packages cached already.
    stack = start_stack(
        tmp_path_factory.mktemp("damaged"),
        make_broker_url(),
        crash_fixtures,
        overrides={"RETRACE_ANALYZER__FETCH_ATTEMPTS": "0"},
    )
    try:
        [rpm] = (stack.home / "var/repo").rglob("glibc-debuginfo-*.rpm")
        body = bytearray(rpm.read_bytes())
        tags = int.from_bytes(body[104:108], "big")
        body[112 + 16 * tags] ^= 0xFF  # in the signature header, which unpacking never reads
        rpm.write_bytes(bytes(body))
        analyzer = Analyzer(stack)
        task_id = analyzer.inject(broken, "damaged-package")
        assert analyzer.wait(task_id) == TaskStatus.FAILURE
        assert analyzer.reason(task_id).startswith(
            f"Retrace failed: A package could not be unpacked: {rpm.name} is not the file "
            "the mirror recorded: its sha256 is "
        )
        wait_gone(analyzer.spool / task_id / "crash" / "coredump")
    finally:
        stack.down()


GDB_MISBEHAVING = {
    # A gdb stuck in a loop, with a child of its own.
    "hangs": (
        "sleep 341 &\nsleep 342\n",
        "Retrace failed: gdb failed: gdb did not finish within 3 s and was killed.",
    ),
    # A gdb that a hostile core made crash.
    "crashes": (
        "kill -SEGV $$\n",
        "Retrace failed: gdb failed: gdb was killed by SIGSEGV before it printed a backtrace.",
    ),
}


@pytest.mark.parametrize("behaviour", sorted(GDB_MISBEHAVING))
def test_a_gdb_that_hangs_or_crashes_fails_the_task_with_the_reason(
    tmp_path_factory: pytest.TempPathFactory,
    make_broker_url: Callable[[], str],
    crash_fixtures: Fixtures,
    broken: Path,
    behaviour: str,
) -> None:
    script, reason = GDB_MISBEHAVING[behaviour]
    home = tmp_path_factory.mktemp(behaviour)
    fake = home / "bin" / "gdb"
    fake.parent.mkdir()
    # Answers --version like gdb, then misbehaves.
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "GNU gdb (fake) 0"; exit 0; }\n' + script
    )
    fake.chmod(0o755)
    stack = HangingStack(home, make_broker_url(), gdb=str(fake))
    stack.up()
    try:
        rpms = [str(r.path) for r in crash_fixtures.rpms]
        assert stack.command("retrace-mirror", "import", *rpms).returncode == 0
        analyzer = Analyzer(stack)
        task_id = analyzer.inject(broken, f"{behaviour}-gdb")
        assert analyzer.wait(task_id) == TaskStatus.FAILURE
        assert analyzer.reason(task_id) == reason
        wait_gone(analyzer.spool / task_id / "crash" / "coredump")
    finally:
        stack.down()
    assert run(["pgrep", "-f", "sleep 34[12]"], timeout=10, check=False).stdout == ""


class HangingStack(Stack):
    """A stack whose analyzer runs the given gdb with a short timeout."""

    def __init__(self, home: Path, broker_url: str, gdb: str) -> None:
        super().__init__(home, broker_url)
        self.gdb = gdb

    @property
    def env(self) -> dict[str, str]:
        return {
            **super().env,
            "RETRACE_ANALYZER__GDB": self.gdb,
            "RETRACE_ANALYZER__GDB_TIMEOUT": "3",
        }
