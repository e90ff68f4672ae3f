"""DANE (RFC 7672) TLSA matching, the RFC 7671 / RFC 6698 cases, and the lookup decisions."""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.delivery.dane import host_requirement
from gateway.tls.dane import (
    DANE,
    DANE_ENCRYPT,
    DANE_ERROR,
    NO_DANE,
    DaneResolver,
    Tlsa,
    match_chain,
    record_matches,
)
from gateway.tls.levels import ENCRYPT
from gateway.tls.policy import TlsRequirement
from tests.harness import TestCA

HOST = "mx.partner.test"


def chain(path: Path) -> list[bytes]:
    """The DER certificates of a PEM chain file (leaf first)."""
    text = path.read_text()
    blocks = [b + "-----END CERTIFICATE-----\n" for b in text.split("-----END CERTIFICATE-----")]
    return [ssl.PEM_cert_to_DER_cert(b.strip() + "\n") for b in blocks if "BEGIN" in b]


def spki(der: bytes) -> bytes:
    key = x509.load_der_x509_certificate(der).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def good(ca: TestCA) -> list[bytes]:
    return chain(ca.valid(HOST).cert_path)


def test_dane_ee_selectors_and_matching_types(good: list[bytes]) -> None:
    leaf = good[0]
    for record in (
        Tlsa(3, 0, 0, leaf),
        Tlsa(3, 0, 1, hashlib.sha256(leaf).digest()),
        Tlsa(3, 0, 2, hashlib.sha512(leaf).digest()),
        Tlsa(3, 1, 0, spki(leaf)),
        Tlsa(3, 1, 1, hashlib.sha256(spki(leaf)).digest()),
        Tlsa(3, 1, 2, hashlib.sha512(spki(leaf)).digest()),
    ):
        assert record_matches(record, leaf), record
        assert match_chain((record,), good, HOST) is None, record


def test_dane_ee_ignores_name_and_expiry(ca: TestCA) -> None:
    """RFC 7672 3.1.1: with DANE-EE the certificate's names and validity are not checked."""
    for leaf in (ca.wrong_name(HOST), ca.expired(HOST)):
        certs = chain(leaf.cert_path)
        record = Tlsa(3, 1, 1, hashlib.sha256(spki(certs[0])).digest())
        assert match_chain((record,), certs, HOST) is None


def test_another_key_does_not_match(ca: TestCA, good: list[bytes]) -> None:
    other = chain(ca.valid(HOST).cert_path)[0]
    record = Tlsa(3, 1, 1, hashlib.sha256(spki(other)).digest())
    assert match_chain((record,), good, HOST) == "no TLSA record matches the certificate chain"


def test_dane_ta_needs_a_valid_chain_for_the_mx_name(ca: TestCA, good: list[bytes]) -> None:
    anchor = good[1]
    for record in (Tlsa(2, 0, 1, hashlib.sha256(anchor).digest()),
                   Tlsa(2, 1, 1, hashlib.sha256(spki(anchor)).digest())):  # fmt: skip
        assert match_chain((record,), good, HOST) is None
        assert match_chain((record,), good, "mx.other.test") is not None  # name checked
        expired = chain(ca.expired(HOST).cert_path)
        assert match_chain((record,), expired, HOST) is not None  # validity checked


def test_dane_ta_record_for_the_leaf_is_not_a_trust_anchor(good: list[bytes]) -> None:
    record = Tlsa(2, 0, 1, hashlib.sha256(good[0]).digest())
    assert match_chain((record,), good, HOST) is not None


def test_unusable_records_are_ignored(good: list[bytes]) -> None:
    """RFC 7672 3.1.3: PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP; so are unknown
    selectors and matching types."""
    digest = hashlib.sha256(spki(good[0])).digest()
    unusable = (Tlsa(1, 1, 1, digest), Tlsa(0, 1, 1, digest), Tlsa(3, 2, 1, digest),
                Tlsa(3, 1, 3, digest))  # fmt: skip
    assert not any(r.usable for r in unusable)
    assert match_chain(unusable, good, HOST) == "no usable TLSA record"
    # one usable matching record among them is enough
    assert match_chain((*unusable, Tlsa(3, 1, 1, digest)), good, HOST) is None
    # a usable but non-matching record beside a matching unusable one: no
    assert match_chain((Tlsa(1, 1, 1, digest), Tlsa(3, 1, 1, b"x" * 32)), good, HOST)


def test_no_certificate() -> None:
    assert match_chain((Tlsa(3, 1, 1, b"x" * 32),), [], HOST) == "no certificate"


# --- lookups -----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: str
    secure: bool
    records: list[Any] = field(default_factory=list)
    rcode: str = "NOERROR"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class FakeResolver:
    def __init__(self, address_secure: bool, tlsa: Answer) -> None:
        self.address_secure, self.tlsa = address_secure, tlsa

    async def addresses(self, host: str) -> Answer:
        return Answer("ok", self.address_secure)

    async def query(self, name: str, rdtype: str) -> Answer:
        assert (name, rdtype) == (f"_25._tcp.{HOST}", "TLSA")
        return self.tlsa


def tlsa_rdata(text: str) -> Any:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TLSA, text)


@pytest.mark.parametrize(
    ("address_secure", "tlsa", "status"),
    [
        (True, Answer("ok", True, [tlsa_rdata("3 1 1 " + "ab" * 32)]), DANE),
        (True, Answer("ok", True, [tlsa_rdata("1 1 1 " + "ab" * 32)]), DANE_ENCRYPT),
        (True, Answer("ok", False, [tlsa_rdata("3 1 1 " + "ab" * 32)]), NO_DANE),  # not AD
        (False, Answer("ok", True, [tlsa_rdata("3 1 1 " + "ab" * 32)]), NO_DANE),
        (True, Answer("nxdomain", True), NO_DANE),
        (True, Answer("tempfail", False, rcode="SERVFAIL"), DANE_ERROR),  # bogus: not stripped
    ],
)
async def test_host_states(address_secure: bool, tlsa: Answer, status: str) -> None:
    found = await DaneResolver(FakeResolver(address_secure, tlsa)).host(HOST)  # type: ignore[arg-type]
    assert found.status == status


async def test_host_requirement_per_state() -> None:
    opportunistic = TlsRequirement()
    secure = DaneResolver(
        FakeResolver(True, Answer("ok", True, [tlsa_rdata("3 1 1 " + "ab" * 32)]))
    )  # type: ignore[arg-type]
    req, problem, _ = await host_requirement(secure, HOST, opportunistic)
    assert req.level == "dane" and req.requires_tls and len(req.tlsa) == 1 and not problem
    unusable = DaneResolver(
        FakeResolver(True, Answer("ok", True, [tlsa_rdata("0 1 1 " + "ab" * 32)]))
    )  # type: ignore[arg-type]
    req, problem, _ = await host_requirement(unusable, HOST, opportunistic)
    assert req.level == ENCRYPT and not problem
    broken = DaneResolver(FakeResolver(True, Answer("tempfail", False, rcode="SERVFAIL")))  # type: ignore[arg-type]
    _, problem, tls = await host_requirement(broken, HOST, opportunistic)
    assert "TLSA lookup" in problem and tls is False
    none = DaneResolver(FakeResolver(True, Answer("nodata", True)))  # type: ignore[arg-type]
    req, problem, _ = await host_requirement(none, HOST, opportunistic)
    assert req is opportunistic and not problem
    _, problem, tls = await host_requirement(none, HOST, TlsRequirement("dane", "hold"))
    assert "DANE required" in problem and tls is True
