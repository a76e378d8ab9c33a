"""Checking a downloaded RPM against Koji's record of it, from the file's own bytes.

Koji records each RPM's ``payloadhash``: the MD5 of its header and payload (the
RPM header's SIGMD5), which a signature does not change, and the size of the
unsigned copy.  :class:`PayloadDigest` recomputes that MD5 from the bytes as they
stream in, so a flipped byte anywhere after the signature header is caught
whatever the file's own header claims.
"""

from __future__ import annotations

import hashlib
import struct

LEAD_SIZE = 96
HEADER_MAGIC = b"\x8e\xad\xe8\x01"
_INTRO = 16  # magic (4), reserved (4), index entries (4), data size (4)


class NotAnRpm(ValueError):
    """The bytes are not an RPM: no lead or no signature header where one must be."""


class PayloadDigest:
    """MD5 of everything after an RPM's signature header, fed chunk by chunk."""

    def __init__(self) -> None:
        self._prefix = b""
        self._start: int | None = None
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def update(self, chunk: bytes) -> None:
        """Feed the next bytes of the file."""
        offset = self.size
        self.size += len(chunk)
        if self._start is not None:
            if self.size > self._start:
                self._md5.update(chunk[max(0, self._start - offset) :])
            return
        self._prefix += chunk
        if len(self._prefix) < LEAD_SIZE + _INTRO:
            return
        if self._prefix[:4] != b"\xed\xab\xee\xdb":
            raise NotAnRpm("no RPM lead")
        intro = self._prefix[LEAD_SIZE : LEAD_SIZE + _INTRO]
        if intro[:4] != HEADER_MAGIC:
            raise NotAnRpm("no signature header after the lead")
        entries, data = struct.unpack(">II", intro[8:16])
        length = _INTRO + 16 * entries + data
        self._start = LEAD_SIZE + length + (-length % 8)
        self._md5.update(self._prefix[self._start :])
        self._prefix = b""

    def hexdigest(self) -> str:
        """The payload hash, as Koji writes it."""
        if self._start is None:
            raise NotAnRpm("the file ended inside the RPM lead or signature header")
        if self.size < self._start:
            raise NotAnRpm("the file ended inside the signature header")
        return self._md5.hexdigest()
