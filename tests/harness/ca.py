"""A throw-away certificate authority for TLS tests (valid, wrong-name and expired leaves)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import ssl
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devkit import certs

WRONG_NAME = "wrong-name.invalid"


@dataclass(frozen=True)
class LeafCert:
    """PEM files of one leaf: `cert_path` (leaf then CA), `key_path`, and both in `pem_path`."""

    names: tuple[str, ...]
    cert_path: Path
    key_path: Path
    pem_path: Path
    not_after: dt.datetime

    def server_context(self) -> ssl.SSLContext:
        """A server-side SSLContext presenting this certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


class TestCA:
    """A CA (EC P-256) written as PEM under `directory` (a temp dir by default).

    `ca_bundle` is the path of the CA certificate to trust; `valid()`, `wrong_name()` and
    `expired()` issue leaves for the given DNS names (or IP addresses).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory: Path | None = None, common_name: str = "SMG Test CA") -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="smg-ca-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        # A temp dir we made goes away with this object (or at exit); a given one stays.
        self._cleanup = (
            weakref.finalize(self, shutil.rmtree, self.dir, True) if directory is None else None
        )
        now = _now()
        self._key = certs.new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.cert = certs.ca_certificate(
            self._key, subject, now - dt.timedelta(days=1), now + dt.timedelta(days=3650)
        )
        self.ca_bundle = self.dir / "ca.pem"
        self.ca_bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._count = 0

    def close(self) -> None:
        """Remove the temp dir with all keys (only when TestCA created it)."""
        if self._cleanup is not None:
            self._cleanup()

    def client_context(self) -> ssl.SSLContext:
        """A client SSLContext that trusts only this CA (and checks host names)."""
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def valid(self, *names: str) -> LeafCert:
        return self.issue(names)

    def wrong_name(self, *_names: str) -> LeafCert:
        """A currently valid leaf that does NOT name the given host (it names WRONG_NAME)."""
        return self.issue([WRONG_NAME])

    def expired(self, *names: str) -> LeafCert:
        """A leaf for `names` that expired yesterday."""
        now = _now()
        return self.issue(
            names, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        )

    def issue(
        self,
        names: tuple[str, ...] | list[str],
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> LeafCert:
        """Issue a leaf for DNS names / IP addresses `names` (first one is the CN)."""
        if not names:
            raise ValueError("a leaf certificate needs at least one name")
        now = _now()
        not_before = not_before or now - dt.timedelta(hours=1)
        not_after = not_after or now + dt.timedelta(days=365)
        key = certs.new_key()
        cert = certs.leaf_certificate(
            key,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
            _general_names(names),
            not_before,
            not_after,
            self.cert,
            self._key,
        )
        return self._write(names, key, cert)

    def _write(
        self,
        names: tuple[str, ...] | list[str],
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
    ) -> LeafCert:
        self._count += 1
        stem = self.dir / f"leaf{self._count}-{names[0].replace('*', 'star')}"
        key_pem = certs.key_pem(key)
        chain_pem = cert.public_bytes(serialization.Encoding.PEM) + self.ca_bundle.read_bytes()
        cert_path, key_path, pem_path = (Path(f"{stem}.{ext}") for ext in ("crt", "key", "pem"))
        cert_path.write_bytes(chain_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
        pem_path.write_bytes(key_pem + chain_pem)  # key first: Postfix smtpd_tls_chain_files
        pem_path.chmod(0o600)
        return LeafCert(tuple(names), cert_path, key_path, pem_path, cert.not_valid_after_utc)


def _general_names(names: tuple[str, ...] | list[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
