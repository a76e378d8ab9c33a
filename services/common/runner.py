"""The one way this project runs external tools.

Every call takes an argument list (never a shell string), has a timeout, starts
its own process group so a timeout kills everything it spawned, and returns the
captured output so the caller can put it in a task log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class CommandError(Exception):
    """A tool failed, could not start, or ran out of time."""

    def __init__(self, argv: Sequence[str], message: str, stderr: str = "") -> None:
        self.argv = list(argv)
        self.stderr = stderr
        detail = f": {stderr.strip()[-2000:]}" if stderr.strip() else ""
        super().__init__(f"{argv[0]} {message}{detail}")


@dataclass(frozen=True)
class Result:
    """What a finished command printed and how long it took."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    stdin: int | None = subprocess.DEVNULL,
    preexec: Callable[[], None] | None = None,
) -> Result:
    """Run ``argv`` and wait for it; raise :class:`CommandError` on failure or timeout.

    With ``check=False`` a non-zero exit is returned instead of raised.
    """
    argv = [str(a) for a in argv]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509 -- only resource limits, set in the child
        )
    except OSError as exc:
        raise CommandError(argv, f"could not start: {exc.strerror}") from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise CommandError(
            argv, f"timed out after {timeout:g} s and was killed", err.decode(errors="replace")
        ) from None
    finally:
        # Whatever happened, nothing it started may outlive it.
        _kill_group(proc)
    result = Result(
        argv=argv,
        returncode=proc.returncode,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        seconds=time.monotonic() - started,
    )
    log.debug("ran %s in %.2f s (exit %d)", argv, result.seconds, result.returncode)
    if check and proc.returncode != 0:
        raise CommandError(argv, _describe_exit(proc.returncode), result.stderr)
    return result


def pipe(
    producer: Sequence[str], consumer: Sequence[str], *, timeout: float, cwd: Path | None = None
) -> Result:
    """Run ``producer | consumer`` without a shell; both must succeed.

    The returned result is the consumer's, with both commands' stderr.
    """
    producer = [str(a) for a in producer]
    consumer = [str(a) for a in consumer]
    started = time.monotonic()
    try:
        first = subprocess.Popen(
            producer,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise CommandError(producer, f"could not start: {exc.strerror}") from exc
    try:
        second = subprocess.Popen(
            consumer,
            cwd=cwd,
            stdin=first.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        _kill_group(first)
        first.wait()
        raise CommandError(consumer, f"could not start: {exc.strerror}") from exc
    assert first.stdout is not None
    assert first.stderr is not None
    first.stdout.close()  # the consumer holds the read end now
    try:
        out, err = second.communicate(timeout=timeout)
        first_err = first.stderr.read()
        first.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        _kill_group(first)
        _kill_group(second)
        second.wait()
        first.wait()
        raise CommandError(
            [*producer, "|", *consumer], f"timed out after {timeout:g} s and was killed"
        ) from None
    finally:
        first.stderr.close()
        _kill_group(first)
        _kill_group(second)
    stderr = first_err.decode(errors="replace") + err.decode(errors="replace")
    if first.returncode != 0:
        raise CommandError(producer, _describe_exit(first.returncode), stderr)
    if second.returncode != 0:
        raise CommandError(consumer, _describe_exit(second.returncode), stderr)
    return Result(
        argv=[*producer, "|", *consumer],
        returncode=0,
        stdout=out.decode(errors="replace"),
        stderr=stderr,
        seconds=time.monotonic() - started,
    )


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
