"""The contracts install alone, and fedora-messaging reads our events with them.

A fresh virtualenv (no system site-packages) gets ``./schemas[fedora-messaging]``
from PyPI and nothing of the server; its own ``fedora-messaging consume``, with
fedora-messaging's stock printer, prints a task-finished event our Publisher sends,
and one sent under the old ``module:Class`` schema name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.messages import Outcome, TaskFinishedV1, legacy_schema_name
from schemas.topology import EXCHANGE, TASK_FINISHED
from services.common.bus import Publisher, connect, declare_topology, properties_for

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
EVENT = TaskFinishedV1(
    task_id="abcdefgh12",
    arch="x86_64",
    outcome=Outcome.SUCCESS,
    crash_function="main",
    crash_module="/usr/bin/crasher",
)
SUMMARY = "Retrace task abcdefgh12 (x86_64) succeeded: the crash is in main (/usr/bin/crasher)"
OLD_EVENT = TaskFinishedV1(
    task_id="oldname012", arch="x86_64", outcome=Outcome.FAILURE, reason="gdb timed out"
)
OLD_SUMMARY = "Retrace task oldname012 (x86_64) failed: gdb timed out"


def clean_env() -> dict[str, str]:
    """Our environment without what would lead a child to the server's virtualenv."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != Path(sys.executable).parent
    )
    return env


@pytest.fixture(scope="module")
def messages_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding ``retrace-server-messages[fedora-messaging]`` only."""
    work = tmp_path_factory.mktemp("messages-venv")
    # pip builds a local project in its own folder: a copy keeps build/ out of the checkout.
    shutil.copytree(
        PROJECT / "schemas",
        work / "schemas",
        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
    )
    venv = work / "venv"
    base = sys._base_executable  # type: ignore[attr-defined]
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # Our pip installs into it (--python): bootstrapping a pip of its own would only cost time.
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--quiet", "--disable-pip-version-check", "./schemas[fedora-messaging]"],
        cwd=work, env=clean_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"installed ./schemas[fedora-messaging] in {time.monotonic() - started:.1f} s")
    return venv


def run_python(venv: Path, code: str) -> subprocess.CompletedProcess[str]:
    """``code`` run isolated (-I: neither the folder nor PYTHONPATH on sys.path) in ``venv``."""
    return subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", code],
        cwd=venv.parent, env=clean_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_schemas_install_alone_without_the_server(messages_venv: Path) -> None:
    ours = run_python(
        messages_venv,
        "import importlib.metadata as md, schemas.fedora, twisted\n"
        "print(sorted(d.metadata['Name'] for d in md.distributions()"
        " if d.metadata['Name'].startswith('retrace')))",
    )
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip() == "['retrace-server-messages']"
    for package in ("services", "client"):
        server = run_python(messages_venv, f"import {package}")
        assert server.returncode != 0
        assert f"No module named '{package}'" in server.stderr


def test_fedora_messaging_consume_there_prints_our_event(
    messages_venv: Path, tmp_path: Path, make_broker_url: Callable[[], str]
) -> None:
    url = make_broker_url()
    connection = connect(url)
    declare_topology(connection.channel(), ("x86_64",))
    (tmp_path / "fm.toml").write_text(f'amqp_url = "{url}"\n')
    out = (tmp_path / "out.txt").open("w+")
    consumer = subprocess.Popen(
        [str(messages_venv / "bin" / "fedora-messaging"), "--conf", str(tmp_path / "fm.toml"),
         "consume", "--callback", "fedora_messaging.example:printer",
         "--exchange", EXCHANGE, "--queue-name", f"retrace-test-consume-{tmp_path.name}",
         "--routing-key", TASK_FINISHED.topic],
        cwd=tmp_path, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    publisher = Publisher(url)

    def printed(what: str, publish: Callable[[], None]) -> str:
        # An event nobody has subscribed to yet is dropped (that is normal for events):
        # publish until the consumer, once its queue is bound, prints it.
        text = ""
        deadline = time.monotonic() + 60
        while what not in text and consumer.poll() is None and time.monotonic() < deadline:
            publish()
            time.sleep(0.5)
            out.seek(0)
            text = out.read()
        return text

    def publish_under_the_old_name() -> None:
        props = properties_for(TASK_FINISHED, OLD_EVENT)
        assert props.headers is not None
        props.headers = {
            **props.headers,
            "fedora_messaging_schema": legacy_schema_name(TaskFinishedV1),
        }
        channel.basic_publish(
            EXCHANGE, TASK_FINISHED.topic, OLD_EVENT.model_dump_json().encode(), props
        )

    channel = connection.channel()
    try:
        text = printed(SUMMARY, lambda: publisher.publish(TASK_FINISHED, EVENT))
        assert SUMMARY in text, text
        text = printed(OLD_SUMMARY, publish_under_the_old_name)
        assert OLD_SUMMARY in text, text
    finally:
        publisher.close()
        connection.close()
        consumer.terminate()
        consumer.wait(timeout=30)
        out.close()
    # The stock printer shows str(message): our summary, then the body.
    after = text[text.index(SUMMARY) + len(SUMMARY) :]
    body, _ = json.JSONDecoder().raw_decode(after[after.index("{") :])
    assert body["task_id"] == "abcdefgh12"
    assert body["crash_function"] == "main"
    assert body["outcome"] == "success"
    # Both names found our classes (fedora-messaging fell back to its bare Message for
    # neither), the old one as a deprecated class, which fedora-messaging warns about.
    assert "not in the schema registry" not in text, text
    assert "deprecated schema (schemas.fedora.LegacyTaskFinishedV1)" in text, text
