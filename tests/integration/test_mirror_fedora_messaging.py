"""``fedora-messaging consume`` reads a real task-finished event of ours off the broker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.messages import Outcome, TaskFinishedV1
from schemas.topology import EXCHANGE, TASK_FINISHED
from services.common.bus import Publisher, connect, declare_topology

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent

PRINTER = """
import json, sys

def printer(message):
    print("GOT", type(message).__name__, json.dumps(message.body, sort_keys=True), flush=True)
"""


def test_fedora_messaging_consume_prints_our_task_finished_event(
    tmp_path: Path, make_broker_url: Callable[[], str]
) -> None:
    url = make_broker_url()
    connection = connect(url)
    declare_topology(connection.channel(), ("x86_64",))
    connection.close()
    (tmp_path / "printer.py").write_text(PRINTER)
    (tmp_path / "fm.toml").write_text(f'amqp_url = "{url}"\n')
    queue = f"retrace-test-consume-{tmp_path.name}"
    out = (tmp_path / "out.txt").open("w+")
    consumer = subprocess.Popen(
        [
            str(BIN / "fedora-messaging"),
            "--conf",
            str(tmp_path / "fm.toml"),
            "consume",
            "--callback-file",
            f"{tmp_path / 'printer.py'}:printer",
            "--exchange",
            EXCHANGE,
            "--queue-name",
            queue,
            "--routing-key",
            TASK_FINISHED.topic,
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    event = TaskFinishedV1(
        task_id="abcdefgh12", arch="x86_64", outcome=Outcome.SUCCESS, crash_function="main"
    )
    publisher = Publisher(url)
    text = ""
    try:
        # An event nobody has subscribed to yet is dropped (that is normal for events):
        # publish until the consumer, once its queue is bound, prints one.
        deadline = time.monotonic() + 60
        while "GOT" not in text and consumer.poll() is None and time.monotonic() < deadline:
            publisher.publish(TASK_FINISHED, event)
            time.sleep(0.5)
            out.seek(0)
            text = out.read()
    finally:
        publisher.close()
        consumer.terminate()
        consumer.wait(timeout=30)
        out.close()
    line = next((x for x in text.splitlines() if x.startswith("GOT ")), None)
    assert line is not None, text
    _, cls, body = line.split(" ", 2)
    assert cls == "TaskFinishedV1"
    assert json.loads(body)["crash_function"] == "main"
    assert json.loads(body)["outcome"] == "success"
