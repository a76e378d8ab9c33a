"""The container and compose files name only commands that exist.

No container engine runs on this machine: each command they name is run directly
(with --help) from the installed package instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BIN = Path(sys.executable).parent


def test_the_container_and_compose_files_name_only_commands_that_exist() -> None:
    """No container engine runs here: each command is run directly with --help."""
    texts = (DEPLOY / "container" / "Containerfile").read_text() + (
        DEPLOY / "container" / "compose.yaml"
    ).read_text()
    commands = set(re.findall(r'\["(retrace-[a-z]+)", "([a-z]+)"', texts))
    assert ("retrace-analyzer", "run") in commands
    for program, subcommand in sorted(commands):
        done = subprocess.run(
            [str(BIN / program), subcommand, "--help"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (program, subcommand, done.stderr)
    assert shutil.which("debuginfod") is not None
