"""The TLS levels a delivery can require, weakest first (docs/tls.md).

- ``opportunistic``: STARTTLS when offered, any certificate, cleartext otherwise,
- ``encrypt``: STARTTLS with TLS >= 1.2 required, any certificate,
- ``verify``: also a chain valid against the CA bundle and a name matching the MX host.

The strings are the values of ``tls_policy.rules[].level`` and the keys of the shared failure
memory (``tls-failures.json``), so they stay plain strings.
"""

from __future__ import annotations

OPPORTUNISTIC, ENCRYPT, VERIFY = "opportunistic", "encrypt", "verify"
# DANE (RFC 7672): TLS authenticated by the MX host's TLSA records.  Not on the scale below:
# a DANE failure (a key the TLSA records do not name) says nothing about PKIX ``verify``.
DANE = "dane"

# A failure at one level implies a failure at every stricter one (no STARTTLS: no verify either).
STRICTNESS = {OPPORTUNISTIC: 0, ENCRYPT: 1, VERIFY: 2}
REQUIRES_TLS = (ENCRYPT, VERIFY, DANE)


def covers(failed: str, wanted: str) -> bool:
    """Does a TLS failure at level ``failed`` mean a failure at ``wanted`` too?"""
    if failed == wanted:
        return True
    if failed not in STRICTNESS or wanted not in STRICTNESS:
        return False
    return STRICTNESS[failed] <= STRICTNESS[wanted]
