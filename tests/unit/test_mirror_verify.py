"""Recomputing Koji's payload hash from a file's own bytes, and the retry delays."""

from __future__ import annotations

import subprocess

import pytest

from services.common.bus import Publisher
from services.mirror.verify import NotAnRpm, PayloadDigest
from services.mirror.worker import WaitQueues
from tests.fixtures.build import Fixtures


def digest_of(data: bytes, chunk: int) -> str:
    digest = PayloadDigest()
    for start in range(0, len(data), chunk):
        digest.update(data[start : start + chunk])
    return digest.hexdigest()


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_the_payload_hash_is_the_headers_sigmd5_whatever_the_chunks(
    crash_fixtures: Fixtures, chunk: int
) -> None:
    rpm = crash_fixtures.rpm("crasher-debuginfo").path
    sigmd5 = subprocess.run(
        ["rpm", "-qp", "--nosignature", "--nodigest", "--qf", "%{SIGMD5}", str(rpm)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert digest_of(rpm.read_bytes(), chunk) == sigmd5


def test_one_flipped_payload_byte_changes_the_hash(crash_fixtures: Fixtures) -> None:
    data = bytearray(crash_fixtures.rpm("crasher").path.read_bytes())
    good = digest_of(bytes(data), 1 << 16)
    data[-100] ^= 1
    assert digest_of(bytes(data), 1 << 16) != good


def test_a_file_that_is_not_an_rpm_is_refused() -> None:
    with pytest.raises(NotAnRpm):
        digest_of(b"<html>502 Bad Gateway</html>" * 10, 64)
    with pytest.raises(NotAnRpm):
        digest_of(b"\xed\xab\xee\xdb", 64)  # cut off inside the lead


def test_retries_wait_longer_each_time_then_keep_the_longest_delay() -> None:
    waits = WaitQueues(Publisher("amqp://unused"), (15, 60, 300))
    assert [waits.delay_for(n) for n in range(1, 6)] == [15, 60, 300, 300, 300]
