"""Describing an established TLS session for the log and the probe, and verifying a chain."""

from __future__ import annotations

import _ssl
import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.tls.levels import DANE, VERIFY
from gateway.tls.policy import TlsRequirement


@dataclass(frozen=True)
class TlsOutcome:
    """What a delivery's TLS was: version, cipher and verification result for the log.

    ``verification``: ``verified`` (checked in the handshake: level verify), ``trusted`` (not
    required, but chain and name would have verified), ``untrusted`` (with ``detail``), or
    ``none`` (no TLS).
    """

    version: str | None
    cipher: str | None
    verification: str
    detail: str = ""

    @property
    def encrypted(self) -> bool:
        return self.version is not None

    def log_fields(self) -> str:
        if not self.encrypted:
            return "tls=none"
        text = f"tls={self.version} cipher={self.cipher} verify={self.verification}"
        return f"{text} ({self.detail})" if self.detail else text


NO_TLS = TlsOutcome(None, None, "none")


def describe_tls(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None, host: str, requirement: TlsRequirement
) -> TlsOutcome:
    """Describe an established TLS session (``ssl.SSLObject`` or ``ssl.SSLSocket``).

    Under ``verify`` the handshake already verified chain and name.  Otherwise the certificate
    is checked here against ``requirement.ca_bundle`` so the log says whether it would pass.
    """
    if ssl_object is None:
        return NO_TLS
    version = ssl_object.version()
    cipher = (ssl_object.cipher() or ("?",))[0]
    if requirement.level == VERIFY:
        return TlsOutcome(version, cipher, "verified")
    if requirement.level == DANE:  # matched a TLSA record in the handshake's aftermath
        return TlsOutcome(version, cipher, "dane")
    problem = verify_chain(peer_chain_der(ssl_object), host, requirement.ca_bundle)
    if problem is None:
        return TlsOutcome(version, cipher, "trusted")
    return TlsOutcome(version, cipher, "untrusted", problem)


def peer_chain_der(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The peer's certificates as DER, leaf first (the whole chain where Python exposes it)."""
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    get_chain = getattr(inner, "get_unverified_chain", None)
    if get_chain is not None:
        try:
            chain = get_chain() or []
            # ssl.ENCODING_DER is public from Python 3.13 on; _ssl has it since 3.10
            ders = [cert.public_bytes(_ssl.ENCODING_DER) for cert in chain]
            if ders:
                return ders
        except (AttributeError, ValueError, ssl.SSLError):
            pass  # fall back to the leaf
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


_STORES: dict[str, Any] = {}


def _store(ca_bundle: Path | None) -> Any:
    from cryptography import x509
    from cryptography.x509 import verification

    key = str(ca_bundle or ssl.get_default_verify_paths().cafile or "")
    if key not in _STORES:
        certs = x509.load_pem_x509_certificates(Path(key).read_bytes()) if key else []
        _STORES[key] = verification.Store(certs) if certs else None
    return _STORES[key]


def verify_chain(chain_der: list[bytes], host: str, ca_bundle: Path | None) -> str | None:
    """None if the chain is valid for ``host`` against ``ca_bundle``, else why not."""
    from cryptography import x509
    from cryptography.x509 import verification

    if not chain_der:
        return "no certificate"
    try:
        store = _store(ca_bundle)
    except (OSError, ValueError) as exc:
        return f"cannot read CA bundle {ca_bundle}: {exc}"
    if store is None:
        return f"no CA certificates in {ca_bundle}"
    try:
        leaf, *rest = (x509.load_der_x509_certificate(der) for der in chain_der)
        name = x509.DNSName(host.rstrip(".").lower())
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(dt.datetime.now(dt.UTC))
            .build_server_verifier(name)
        )
        verifier.verify(leaf, rest)
    except verification.VerificationError as exc:
        return _short_reason(str(exc))
    except ValueError as exc:
        return f"bad certificate: {exc}"
    return None


def _short_reason(message: str) -> str:
    """A short reason from cryptography's verification message, like OpenSSL's wording."""
    lowered = message.lower()
    if "not valid at validation time" in lowered or "expired" in lowered:
        return "certificate has expired or is not yet valid"
    if "subjectaltname" in lowered:
        return "certificate name does not match the MX host name"
    if "candidates exhausted" in lowered or "issuer" in lowered:
        return "chain not trusted by the CA bundle"
    return message.split(" (encountered", 1)[0]
