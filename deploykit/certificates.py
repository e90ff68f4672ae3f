"""The hosts' certificates: each must name its host as peers reach it, be valid now, match
its key, and not be near its end.  The same checks run on the control machine's files before a
deploy and (``tests/infra``) on the certificate each host really serves."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from deploykit.checks import Checker, is_parsed
from deploykit.host import Gateway


def check_tls_files(checker: Checker, gateway: Gateway) -> None:
    for key in ("internal_ca_file", "public_ca_file", "tls_cert_file", "tls_key_file"):
        value = gateway[key]
        if value is None or not is_parsed(value):
            continue
        if not Path(value).is_file():
            checker.problem(checker.source(gateway, key), key, f"{value}: no such file")
    cert, key = gateway["tls_cert_file"], gateway["tls_key_file"]
    if is_parsed(cert, key) and Path(cert).is_file() and Path(key).is_file():
        source = checker.source(gateway, "tls_cert_file")
        why = certificate_problem(Path(cert), Path(key), gateway)
        if why:
            checker.problem(source, "tls_cert_file", why)
        else:
            soon = certificate_expiry_warning(
                x509.load_pem_x509_certificate(Path(cert).read_bytes()), cert
            )
            if soon:
                checker.warn(source, "tls_cert_file", soon)


# A certificate this close to its end gets a warning at every deploy (the monitoring's alert
# fires at the same age), so the renewal is a planned change request, not an outage.
CERT_RENEW_DAYS = 21


def certificate_problem(cert_path: Path, key_path: Path, gateway: Gateway) -> str | None:
    """The certificate must name the host as its peers reach it, be valid now, and match its
    key."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        return f"cannot read the certificate or its key: {exc}"
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        return f"{cert_path} does not belong to the key {key_path}"
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return f"{cert_path} is not valid now (valid {start:%Y-%m-%d} to {end:%Y-%m-%d})"
    return certificate_names_problem(cert, str(cert_path), gateway)


def certificate_names_problem(cert: x509.Certificate, label: str, gateway: Gateway) -> str | None:
    """The certificate must name the host, and a bad gateway's must carry the address the good
    gateways reach it by.  Also run by testinfra on the certificate a host really has."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"{label} has no subjectAltName"
    names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    addresses = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    if is_parsed(gateway.fqdn, gateway.public_address, gateway.listen_address) and not (
        gateway.fqdn in names or {gateway.public_address, gateway.listen_address} & addresses
    ):
        return f"{label} names neither {gateway.fqdn} nor {gateway.public_address}"
    reached_at = gateway.listen_address  # the fleet's private network (docs/deploy.md)
    if gateway.role == "bad" and is_parsed(reached_at) and (reached_at not in addresses):
        # The good gateways reach a bad gateway by its address (routing.bad_gateways) and
        # verify that address against the certificate: without it, spam waits and bounces.
        return (
            f"{label} has no IP address entry {reached_at} in its "
            "subjectAltName: the good gateways connect to the bad gateway by that address "
            "(routing.bad_gateways) and verify it, so rerouted spam would wait in their "
            "queues and bounce after delivery.max_lifetime"
        )
    return None


def certificate_expiry_warning(
    cert: x509.Certificate, label: str, now: dt.datetime | None = None
) -> str | None:
    """A warning when the certificate ends within :data:`CERT_RENEW_DAYS` days."""
    left = cert.not_valid_after_utc - (now or dt.datetime.now(dt.UTC))
    if left > dt.timedelta(days=CERT_RENEW_DAYS):
        return None
    end = cert.not_valid_after_utc
    return (
        f"{label} expires on {end:%Y-%m-%d %H:%M} UTC, in {left.days} days "
        f"(renew it when fewer than {CERT_RENEW_DAYS} days are left)"
    )
