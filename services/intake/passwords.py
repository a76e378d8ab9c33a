"""Task passwords: made from a CSPRNG, stored only as digests, compared in constant time.

A fast hash is enough: the passwords are 32 random characters, not human secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PASSWORD_LENGTH = 32


def new_password() -> str:
    """A fresh 32-character URL-safe password."""
    return secrets.token_urlsafe(24)  # 24 random bytes → 32 characters


def digest(password: str) -> str:
    """What the store keeps instead of the password."""
    return hashlib.sha256(password.encode()).hexdigest()


def matches(password: str | None, stored_digest: str) -> bool:
    """Whether ``password`` is the one whose digest is stored."""
    if not password:
        return False
    return hmac.compare_digest(digest(password), stored_digest)
