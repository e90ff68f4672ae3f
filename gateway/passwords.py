"""Password hashes for the tenants' SMTP AUTH users: scrypt, never clear text on a host.

The stored form is ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>`` (salt and hash in
base64 without padding; the same layout as passlib's scrypt hashes), made by
``smg tenant hash-password``.  scrypt is in the standard library (``hashlib.scrypt``, OpenSSL),
costs memory as well as time (N=2^14, r=8: 16 MiB), so a stolen smg.toml is expensive to
guess from.  :func:`verify` compares in constant time.  One verification takes tens of
milliseconds of CPU: the intake runs it in a thread (``gateway.intake.auth``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

PREFIX = "$scrypt$"
LOG2_N = 14  # N = 16384: 16 MiB with r = 8
R = 8
P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_LOG2_N = 20  # a hash asking for more (1 GiB) is refused at load, not tried at AUTH
_FORMAT = re.compile(
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]{16,})\$([A-Za-z0-9+/]{32,})"
)


class BadHash(ValueError):
    """The text is not a hash :func:`verify` can check; the message says why."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _derive(password: bytes, salt: bytes, log2_n: int, r: int, p: int, size: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=size, maxmem=n * r * 128 * 2 + 1024 * 1024
    )


def hash_password(password: str, *, log2_n: int = LOG2_N) -> str:
    """A new ``$scrypt$`` hash of ``password`` with a random salt."""
    if not password:
        raise ValueError("an empty password cannot be hashed")
    salt = os.urandom(SALT_BYTES)
    digest = _derive(password.encode("utf-8"), salt, log2_n, R, P, HASH_BYTES)
    return f"{PREFIX}ln={log2_n},r={R},p={P}${_b64(salt)}${_b64(digest)}"


def parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    """``(log2 N, r, p, salt, hash)`` of a stored hash, or :class:`BadHash`."""
    match = _FORMAT.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise BadHash(
            "expected a hash made by 'smg tenant hash-password' ($scrypt$ln=..,r=..,p=..$salt$hash)"
            ", never a clear-text password"
        )
    log2_n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not (10 <= log2_n <= MAX_LOG2_N and 1 <= r <= 32 and 1 <= p <= 16):
        raise BadHash(f"scrypt parameters out of range (ln 10-{MAX_LOG2_N}, r 1-32, p 1-16)")
    return log2_n, r, p, _unb64(match.group(4)), _unb64(match.group(5))


def verify(password: str | bytes, stored: str) -> bool:
    """Does ``password`` match ``stored``?  Constant time in the comparison; False for a
    hash that cannot be read (never an exception at AUTH)."""
    try:
        log2_n, r, p, salt, expected = parse_hash(stored)
    except BadHash:
        return False
    secret = password.encode("utf-8") if isinstance(password, str) else password
    digest = _derive(secret, salt, log2_n, r, p, len(expected))
    return hmac.compare_digest(digest, expected)
