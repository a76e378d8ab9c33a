"""schemathesis against ``/openapi.json`` of a running intake with healthy dependencies:
no 500 and no status the description does not document.

This module is also the schemathesis hooks module of that run: it teaches
schemathesis to send the archive content types as raw bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import schemathesis

from services.intake.upload import DECODERS
from tests.integration.test_intake_http import start_intake

pytestmark = pytest.mark.integration

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
ROOT = Path(__file__).resolve().parents[2]


# An archive is sent as the raw bytes schemathesis generates for a binary body.
schemathesis.serializer.alias(list(DECODERS), "application/octet-stream")


def test_schemathesis_finds_no_500_and_no_undocumented_status(
    tmp_path: Path, make_broker_url: Callable[[], str]
) -> None:
    intake = start_intake(tmp_path, make_broker_url(), f"sqlite:///{tmp_path}/retrace.sqlite3")
    try:
        healthy = intake.request("GET", "/__heartbeat__")
        assert healthy[0] == 200, healthy
        run = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"{intake.base}/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance",
                "--max-examples",
                "30",
                "--workers",
                "1",
                "--seed",
                "1",
                "--suppress-health-check",
                "all",
                "--generation-database",
                "none",
                "--no-color",
                "--report-dir",
                str(tmp_path / "report"),
            ],
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "tests.integration.test_intake_openapi",
                "PYTHONPATH": str(ROOT),
            },
            # schemathesis keeps a cache in its working directory: not in the checkout.
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:] + intake.logs()
        assert "0 generated" not in run.stdout
    finally:
        intake.down()
