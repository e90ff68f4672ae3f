"""The lab CA: the far ends' certificates (the lab's "public" CA) and each gateway's certificate
(the fleet's internal CA for good-to-bad TLS). Everything lands under lab/run/pki/."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devkit import certs
from lab.config import PKI_DIR

CA_CERT = PKI_DIR / "ca.crt"
CA_KEY = PKI_DIR / "ca.key"
VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(certs.key_pem(key))
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Secure Mail Gateway lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def ensure_ca() -> None:
    if CA_CERT.exists() and CA_KEY.exists():
        return
    PKI_DIR.mkdir(parents=True, exist_ok=True)
    key = certs.new_key()
    now = dt.datetime.now(dt.UTC)
    cert = certs.ca_certificate(
        key, _name("Secure Mail Gateway lab CA"), now - dt.timedelta(hours=1), now + VALIDITY
    )
    _write_key(key, CA_KEY)
    CA_CERT.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue(label: str, dns_names: list[str], addresses: list[str]) -> Issued:
    """A server+client certificate for dns_names/addresses, signed by the lab CA."""
    ensure_ca()
    ca_key = serialization.load_pem_private_key(CA_KEY.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(CA_CERT.read_bytes())
    key = certs.new_key()
    now = dt.datetime.now(dt.UTC)
    san = [x509.DNSName(n) for n in dns_names] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in addresses
    ]
    cert = certs.leaf_certificate(
        key,
        _name(dns_names[0]),
        san,
        now - dt.timedelta(hours=1),
        now + VALIDITY,
        ca_cert,
        ca_key,  # type: ignore[arg-type]
    )
    out = PKI_DIR / "certs"
    out.mkdir(parents=True, exist_ok=True)
    issued = Issued(cert=out / f"{label}.crt", key=out / f"{label}.key")
    _write_key(key, issued.key)
    # Leaf only: the CA is a root, which clients must already trust (and servers need not send).
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return issued
