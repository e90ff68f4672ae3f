"""The TLS levels a delivery can require, weakest first (docs/tls.md).

- ``opportunistic``: STARTTLS when offered, any certificate, cleartext otherwise,
- ``encrypt``: STARTTLS with TLS >= 1.2 required, any certificate,
- ``verify``: also a chain valid against the CA bundle and a name matching the MX host.

The strings are the values of ``tls_policy.rules[].level`` and the keys of the shared failure
memory (``tls-failures.json``), so they stay plain strings.
"""

from __future__ import annotations

OPPORTUNISTIC, ENCRYPT, VERIFY = "opportunistic", "encrypt", "verify"

# A failure at one level implies a failure at every stricter one (no STARTTLS: no verify either).
STRICTNESS = {OPPORTUNISTIC: 0, ENCRYPT: 1, VERIFY: 2}
