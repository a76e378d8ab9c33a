"""retrace-client: send a crash to a Retrace Server and get its backtrace back.

Exit codes: 0 done; 1 the retrace failed (its log is printed); 2 bad usage or
local input; 3 refused (by the server, or early because it could not take the
crash); 4 the server is unreachable or failing; 5 the task has not finished yet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from client import minicore, problem
from client import settings as client_settings
from client.api import Server, next_password, parse_json
from client.errors import (
    EXIT_OK,
    EXIT_PENDING,
    EXIT_RETRACE_FAILED,
    EXIT_USAGE,
    ClientError,
    Refused,
)
from client.state import Remembered, State, default_path

MIB = 1 << 20
FINISHED = ("FINISHED_SUCCESS", "FINISHED_FAILURE")


class Bar:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self._label = label
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        if not self._tty or total <= 0:
            return
        percent = min(100, done * 100 // total)
        if percent != self._last:
            self._last = percent
            line = f"\r{self._label} {percent:3d}% ({done / MIB:.1f} / {total / MIB:.1f} MiB)"
            print(line, end="", file=self._stream, flush=True)

    def done(self) -> None:
        if self._tty and self._last >= 0:
            print(file=self._stream)


def _add_crash_source(parser: argparse.ArgumentParser, *, sending: bool = True) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dir", type=Path, help="an ABRT problem directory")
    source.add_argument("--core", type=Path, help="a core file (with --executable, --package)")
    source.add_argument("--coredumpctl", metavar="MATCH", help="a crash systemd-coredump kept")
    if sending:
        parser.add_argument("--executable", help="with --core: the crashed program's path")
        parser.add_argument("--package", help="with --core: its package NVR (name-version-release)")
        parser.add_argument(
            "--no-unlink", action="store_true", help="keep the packed archive and print its path"
        )
        parser.add_argument(
            "--force", action="store_true", help="send even if the server says it cannot help"
        )
    group = parser.add_argument_group(
        "minimal cores",
        "Send only what a retrace needs: the notes, each thread's stack from its pointer "
        "down to a red zone, the modules' headers and data, small anonymous mappings, TLS "
        "and the loader's list (README, client section). The top of the main stack holds "
        "the program's arguments and environment strings: the arguments are sent, the "
        "environment too unless --blank-environment. Defaults come from the settings file "
        "(--config).",
    )
    if sending:
        group.add_argument(
            "--minimal",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="send a minimal core (default: the setting 'minimal', else no)",
        )
        group.add_argument(
            "--minimal-report",
            action="store_true",
            help="send a minimal core and print what it keeps and drops",
        )
    group.add_argument(
        "--red-zone", type=_count, metavar="BYTES", help="kept below each stack pointer (4096)"
    )
    group.add_argument(
        "--max-anonymous",
        type=_count,
        metavar="KIB",
        help="anonymous mappings up to this size are kept whole (64)",
    )
    group.add_argument(
        "--blank-environment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="zero the environment strings in the minimal core",
    )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("it cannot be negative")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrace-client",
        description="Send a crash to a Retrace Server and get its backtrace back.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--uri",
        default=os.environ.get("RETRACE_SERVER_URI"),
        help="the server (default: $RETRACE_SERVER_URI)",
    )
    parser.add_argument("--insecure", action="store_true", help="do not verify HTTPS certificates")
    parser.add_argument("--state", type=Path, default=None, help="the task list file")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the settings file (default: $RETRACE_CLIENT_CONFIG, else "
        "$XDG_CONFIG_HOME/retrace-client/client.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="send a crash; print the task id and password")
    _add_crash_source(create)
    batch = sub.add_parser("batch", help="send a crash, wait, print the backtrace (or the log)")
    _add_crash_source(batch)
    batch.add_argument("--status-delay", type=float, default=10, help="seconds between polls")
    for name, text in (
        ("status", "the task's status and progress"),
        ("log", "the task's log"),
        ("backtrace", "the task's backtrace"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("task")
        cmd.add_argument("--password", help="the task password, if this client did not create it")
        if name == "backtrace":
            cmd.add_argument("--json", action="store_true", help="the structured backtrace")
    sub.add_parser("settings", help="the server's limits and supported releases")
    minimize = sub.add_parser(
        "minimize", help="write the minimal core of a crash and say what it keeps; send nothing"
    )
    _add_crash_source(minimize, sending=False)
    minimize.add_argument("--output", "-o", type=Path, required=True, help="the minimal core")
    return parser


class Client:
    """The commands, with the server and the task list they use."""

    def __init__(self, args: argparse.Namespace, out: Callable[[str], None]) -> None:
        self.args = args
        self.out = out
        self.state = State(args.state or default_path())

    def server(self, remembered: Remembered | None = None) -> Server:
        uri = self.args.uri or (remembered.server if remembered else None)
        if not uri:
            raise ClientError("name the server with --uri or RETRACE_SERVER_URI")
        return Server(uri, self.args.insecure)

    # -- creating -----------------------------------------------------------

    def gather(self, workdir: Path) -> problem.Crash:
        args = self.args
        if args.dir:
            return problem.from_problem_dir(args.dir)
        if args.core:
            if not args.executable or not args.package:
                raise ClientError("--core needs --executable and --package")
            return problem.from_core(args.core, args.executable, args.package)
        return problem.from_coredumpctl(args.coredumpctl, workdir)

    def core_only(self, workdir: Path) -> tuple[Path, bool]:
        """The crash's core alone (``minimize``), and whether it is a copy of ours."""
        args = self.args
        if args.dir:
            return problem.from_problem_dir(args.dir).core, False
        if args.core:
            if not args.core.is_file():
                raise ClientError(f"{args.core} is not a file")
            return args.core, False
        return problem.dump_coredumpctl(args.coredumpctl, workdir), True

    # -- minimal cores ------------------------------------------------------

    def settings(self) -> client_settings.Settings:
        return client_settings.load(self.args.config)

    def minimal_options(self, settings: client_settings.Settings) -> minicore.Options:
        args = self.args
        red_zone = settings.red_zone if args.red_zone is None else args.red_zone
        kib = settings.max_anonymous_kib if args.max_anonymous is None else args.max_anonymous
        blank = args.blank_environment
        return minicore.Options(
            red_zone=red_zone,
            max_anonymous=kib * minicore.KIB,
            blank_environment=settings.blank_environment if blank is None else blank,
        )

    def minimal(self, crash: problem.Crash, workdir: Path) -> problem.Crash:
        """The crash with its core minimised, when --minimal, --minimal-report or the
        settings ask for it."""
        args, settings = self.args, self.settings()
        wanted = args.minimal
        if wanted is None:
            wanted = args.minimal_report or settings.minimal
        if not wanted:
            if args.minimal_report:
                raise ClientError("--minimal-report reports on a minimal core, not --no-minimal")
            return crash
        dest = workdir / "coredump.minimal"
        outcome = minicore.minimize(crash.core, dest, self.minimal_options(settings))
        if crash.temporary_core:
            crash.core.unlink(missing_ok=True)
        if args.minimal_report:
            print(outcome.report(), file=sys.stderr)
        else:
            share = 100 * outcome.size / max(outcome.full_size, 1)
            sent = "blanked" if outcome.options.blank_environment else "sent"
            print(
                f"minimal core: {outcome.size / MIB:.1f} of {outcome.full_size / MIB:.1f} MiB "
                f"({share:.2f} %), the program's arguments sent and its environment {sent}; "
                "--minimal-report says what it keeps",
                file=sys.stderr,
            )
        return problem.Crash(dest, crash.texts, temporary_core=True)

    def minimize(self) -> str:
        """``retrace-client minimize``: write the minimal core, return the report."""
        with tempfile.TemporaryDirectory(prefix="retrace-client-") as workdir:
            core, ours = self.core_only(Path(workdir))
            outcome = minicore.minimize(
                core, self.args.output, self.minimal_options(self.settings())
            )
            if ours:
                core.unlink(missing_ok=True)
        return f"{outcome.report()}\nwritten to {self.args.output}"

    def preflight(self, server: Server, crash: problem.Crash) -> dict[str, str]:
        """Refuse early, as ABRT's client does, when the server cannot take the crash."""
        settings = server.settings()
        running, limit = settings.get("running_tasks"), settings.get("max_running_tasks")
        if running and limit and int(running) >= int(limit) and not self.args.force:
            raise Refused(f"the server is full ({running} of {limit} tasks); try again later")
        unpacked = crash.core.stat().st_size + sum(len(t) for t in crash.texts.values())
        max_unpacked = int(settings.get("max_unpacked_size", "0")) * MIB
        if max_unpacked and unpacked > max_unpacked and not self.args.force:
            raise Refused(
                f"the core is {unpacked / MIB:.0f} MiB; the server takes at most "
                f"{max_unpacked // MIB} MiB unpacked"
            )
        if not self.args.force and not server.has_package(crash.package, crash.arch):
            raise Refused(
                f"the server does not have {crash.package} ({crash.arch}); "
                "--force sends the crash anyway"
            )
        return settings

    def create(self) -> tuple[Server, str, str]:
        with tempfile.TemporaryDirectory(prefix="retrace-client-") as workdir:
            crash = self.minimal(self.gather(Path(workdir)), Path(workdir))
            server = self.server()
            settings = self.preflight(server, crash)
            bar = Bar("Packing  ")
            archive, size, kept = problem.pack(crash, self.args.no_unlink, bar)
            bar.done()
        with archive:
            max_packed = int(settings.get("max_packed_size", "0")) * MIB
            if max_packed and size > max_packed and not self.args.force:
                raise Refused(
                    f"the packed crash is {size / MIB:.1f} MiB; the server takes at most "
                    f"{max_packed // MIB} MiB"
                )
            if kept:
                print(f"archive kept at {kept}", file=sys.stderr)
            bar = Bar("Uploading")
            task, password = server.create(archive, size, bar)
            bar.done()
        self.state.put(task, Remembered(server.uri, password))
        return server, task, password

    # -- one task -----------------------------------------------------------

    def fetch(self, task: str, suffix: str = "", accept: str | None = None) -> tuple[str, bytes]:
        """One request about a task, following password rotation; returns status-or-body."""
        remembered = self.state.get(task)
        password = getattr(self.args, "password", None) or (
            remembered.password if remembered else None
        )
        if not password:
            raise ClientError(f"no password known for task {task}: give it with --password")
        server = self.server(remembered)
        answer = server.task(task, password, suffix, accept)
        self.state.put(task, Remembered(server.uri, next_password(answer, password)))
        return answer.headers.get("X-Task-Status", ""), answer.body

    def status(self, task: str) -> tuple[str, str]:
        status, body = self.fetch(task)
        return status, body.decode(errors="replace").strip()

    def wait(self, task: str, delay: float) -> str:
        bar_tty = sys.stderr.isatty()
        last = ""
        while True:
            status, progress = self.status(task)
            line = f"{status}: {progress}" if progress else status
            if line != last:
                end = "" if bar_tty else "\n"
                prefix = "\r\033[K" if bar_tty else ""
                print(f"{prefix}{line}", end=end, file=sys.stderr, flush=True)
                last = line
            if status in FINISHED:
                if bar_tty:
                    print(file=sys.stderr)
                return status
            time.sleep(delay)


def _run(client: Client) -> int:  # noqa: PLR0911 -- one return per command
    args = client.args
    if args.command == "settings":
        for key, value in client.server().settings().items():
            client.out(f"{key} {value}")
        return EXIT_OK
    if args.command == "minimize":
        client.out(client.minimize())
        return EXIT_OK
    if args.command == "create":
        _, task, password = client.create()
        client.out(f"Task Id: {task}\nTask Password: {password}")
        return EXIT_OK
    if args.command == "batch":
        _, task, _ = client.create()
        print(f"task {task}", file=sys.stderr)
        return _finish(client, task, client.wait(task, args.status_delay), args.dir, as_json=False)
    if args.command == "status":
        status, progress = client.status(args.task)
        client.out(status)
        if progress:
            client.out(progress)
        return EXIT_OK
    status, _ = client.status(args.task)
    if status not in FINISHED:
        print(f"task {args.task} has not finished yet ({status})", file=sys.stderr)
        return EXIT_PENDING
    if args.command == "log":
        client.out(client.fetch(args.task, "/log")[1].decode(errors="replace").rstrip("\n"))
        return EXIT_OK
    return _finish(client, args.task, status, None, as_json=args.json)


def _finish(client: Client, task: str, status: str, directory: Path | None, as_json: bool) -> int:
    if status != "FINISHED_SUCCESS":
        client.out(client.fetch(task, "/log")[1].decode(errors="replace").rstrip("\n"))
        print(f"the retrace of task {task} failed; its log is above", file=sys.stderr)
        return EXIT_RETRACE_FAILED
    if as_json:
        _, body = client.fetch(task, "/backtrace", accept="application/json")
        client.out(json.dumps(parse_json(body), indent=2, sort_keys=True))
        return EXIT_OK
    backtrace = client.fetch(task, "/backtrace")[1].decode(errors="replace")
    client.out(backtrace.rstrip("\n"))
    if directory is not None:
        (directory / "backtrace").write_text(backtrace, encoding="utf-8")
        print(f"saved to {directory / 'backtrace'}", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``retrace-client``."""
    args = _parser().parse_args(argv)
    client = Client(args, print)
    try:
        return _run(client)
    except ClientError as exc:
        print(f"retrace-client: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
