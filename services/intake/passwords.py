"""Task passwords: made from a CSPRNG, stored only as digests, compared in constant time.

A fast hash is enough: the passwords are 32 random characters, not human secrets.

Single-use passwords (the default, as the original feature page describes): every
answer to a right password carries the next one, and the used one stops working.
The next password is not random but derived, ``HMAC(server key, task id, used
password)``, so that it can be given again:

- the password just replaced is accepted once more within a short grace window, and
  that answer carries the same next password.  A client whose answer was lost in
  transit sends its old password again and is back in step.
- two concurrent requests with the same password both succeed with the same next
  password: one rotates, the other finds the rotation done and replays.

Only someone who holds a valid password can learn the next one; without the server
key, an old password that leaked (a log, a shell history) does not give the current
one.  With ``password_mode = "static"`` a task keeps its first password.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
from pathlib import Path

PASSWORD_LENGTH = 32
KEY_FILE = ".password-key"


TOKEN_ALPHABET = string.ascii_letters + string.digits


def random_token(length: int) -> str:
    """``length`` random letters and digits (5.95 bits each).

    Never ``-`` or ``_``: a token starting with ``-`` (one in 64 of
    ``token_urlsafe``'s) reads as an option on every command line that takes it.
    """
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(length))


def new_password() -> str:
    """A fresh 32-character password (about 190 random bits), as the original's were."""
    return random_token(PASSWORD_LENGTH)


def digest(password: str) -> str:
    """What the store keeps instead of the password."""
    return hashlib.sha256(password.encode()).hexdigest()


def matches(password: str | None, stored_digest: str | None) -> bool:
    """Whether ``password`` is the one whose digest is stored."""
    if not password or not stored_digest:
        return False
    return hmac.compare_digest(digest(password), stored_digest)


def following(key: bytes, task_id: str, password: str) -> str:
    """The password that replaces ``password`` of ``task_id``: always the same one.

    Letters and digits, like a new one: the MAC written in base 62, its lowest 32
    digits (about 190 bits).
    """
    mac = hmac.new(key, f"{task_id}\0{password}".encode(), hashlib.sha256).digest()
    number = int.from_bytes(mac, "big")
    digits = []
    for _ in range(PASSWORD_LENGTH):
        number, digit = divmod(number, len(TOKEN_ALPHABET))
        digits.append(TOKEN_ALPHABET[digit])
    return "".join(digits)


def server_key(configured: str, spool: Path) -> bytes:
    """The key next passwords are derived from: the configured one, or one made once
    and kept in the spool, so every intake worker and host sharing it agrees."""
    if configured:
        return configured.encode()
    path = spool / KEY_FILE
    spool.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        # Written whole under a temporary name first would need a rename; one small
        # write to a fresh file is atomic enough for readers that retry on empty.
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
    for _ in range(50):
        key = path.read_bytes().strip()
        if key:
            return key
        os.sched_yield()
    raise RuntimeError(f"{path} is empty: remove it and start again")
