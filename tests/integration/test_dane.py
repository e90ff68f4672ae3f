"""DANE (RFC 7672) through the real ``smg serve``, a real validating resolver (unbound) over a
DNSSEC-signed knot zone, and real Postfix far ends (issue 14, point 2).

``dane.test`` is signed by knot (``dnssec-signing: on``); unbound trusts its KSK and sets AD.
``nosig.test`` is not signed: its TLSA record is insecure and must be ignored.

- 127.0.29.11 ``mx.good.dane.test``: TLSA 3 1 1 (DANE-EE) of its key: delivered, ``verify=dane``;
- 127.0.29.12 ``mx.bad.dane.test``: TLSA 3 1 1 of another key: deferred, never a MAIL FROM;
- 127.0.29.13 ``mx.ta.dane.test``: TLSA 2 0 1 (DANE-TA) of the tests' CA: delivered;
- 127.0.29.14 ``mx.none.dane.test``: no TLSA: delivered as before (opportunistic);
- 127.0.29.15 ``mx.nosig.test``: a wrong TLSA in an unsigned zone: ignored, delivered.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import require_binaries
from tests.harness import KnotDNS, TestCA, wait_for
from tests.harness.postfix import PostfixFarEnd
from tests.harness.swaks import swaks
from tests.harness.unbound import Unbound
from tests.integration.smg_relay import base_config, server_said
from tests.integration.tls_support import (
    TlsRelay,
    common_port,
    mail_from_logged,
    queue_entry,
    send,
    started_far_ends,
    with_mid,
)

pytestmark = pytest.mark.integration

SOURCE = "127.0.29.5"
BANK = "alice@bank.dane.test"
FAR_ENDS = {
    "good": ("127.0.29.11", "valid"),
    "bad": ("127.0.29.12", "valid"),
    "ta": ("127.0.29.13", "valid"),
    "none": ("127.0.29.14", "valid"),
    "nosig": ("127.0.29.15", "valid"),
}
RULES = [
    {"sender": "bank.dane.test", "recipient": "reject.dane.test", "level": "encrypt",
     "on_failure": "reject"},
    {"sender": "bank.dane.test", "recipient": "must.dane.test", "level": "dane",
     "on_failure": "reject"},
]  # fmt: skip


def hostname(name: str) -> str:
    return "mx.nosig.test" if name == "nosig" else f"mx.{name}.dane.test"


def spki_sha256(far: PostfixFarEnd) -> str:
    assert far.certificate is not None
    leaf = x509.load_pem_x509_certificate(far.certificate.cert_path.read_bytes())
    key = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(key).hexdigest()


@pytest.fixture(scope="module")
def port() -> int:
    return common_port(*(a for a, _ in FAR_ENDS.values()), SOURCE)


@pytest.fixture(scope="module")
def far(port: int, test_ca: TestCA) -> Iterator[dict[str, PostfixFarEnd]]:
    require_binaries("postfix", "swaks", "unbound")
    with started_far_ends(FAR_ENDS, port, test_ca, hostname) as started:
        yield started


@pytest.fixture(scope="module")
def resolver(far, test_ca: TestCA) -> Iterator[Unbound]:
    ca_der = ssl.PEM_cert_to_DER_cert(test_ca.ca_bundle.read_text())
    wrong = hashlib.sha256(b"not the key").hexdigest()
    signed = f"""
bank                MX 10 mx.good
good                MX 10 mx.good
mx.good             A 127.0.29.11
_25._tcp.mx.good    TLSA 3 1 1 {spki_sha256(far["good"])}
bad                 MX 10 mx.bad
reject              MX 10 mx.bad
must                MX 10 mx.none
mx.bad              A 127.0.29.12
_25._tcp.mx.bad     TLSA 3 1 1 {wrong}
ta                  MX 10 mx.ta
mx.ta               A 127.0.29.13
_25._tcp.mx.ta      TLSA 2 0 1 {hashlib.sha256(ca_der).hexdigest()}
none                MX 10 mx.none
mx.none             A 127.0.29.14
"""
    unsigned = f"""
@                   MX 10 mx
mx                  A 127.0.29.15
_25._tcp.mx         TLSA 3 1 1 {wrong}
"""
    knot = KnotDNS({"dane.test": signed, "nosig.test": unsigned}, address="127.0.29.53")
    knot.sign_zone("dane.test")
    knot.start()
    unbound = Unbound({".": knot.nameserver}, [knot.trust_anchor("dane.test")], "127.0.29.54")
    try:
        unbound.start()
        yield unbound
    finally:
        unbound.close()
        knot.close()


@pytest.fixture(scope="module")
def relay(resolver: Unbound, port, far, tmp_path_factory) -> Iterator[TlsRelay]:
    tmp = tmp_path_factory.mktemp("dane")
    config = base_config(tmp, resolver.nameserver)
    config["gateway"]["source_address"] = SOURCE
    config["delivery"] = {"port": port, "retry_initial": "1h", "scan_interval": "200ms",
                          "throttle_pause": "1s"}  # fmt: skip
    config["mta_sts"] = {"enabled": False}
    relay = TlsRelay(tmp, config, RULES)
    relay.start()
    yield relay
    relay.stop()


def delivered(far_end: PostfixFarEnd, mid: str):
    return wait_for(lambda: with_mid(far_end.received(), mid), 20, what=mid)[0]


def log_line(relay: TlsRelay, rcpt: str) -> str:
    return wait_for(
        lambda: [x for x in relay.log_path.read_text().splitlines() if f"to=<{rcpt}>" in x],
        20,
        what=f"the delivery line of {rcpt}",
    )[-1]


def test_matching_dane_ee_record_delivers_over_tls(relay, far) -> None:
    send(relay, BANK, "ann@good.dane.test", "dane-good")
    assert delivered(far["good"], "dane-good").tls
    assert "verify=dane" in log_line(relay, "ann@good.dane.test")


def test_matching_dane_ta_record_delivers(relay, far) -> None:
    send(relay, BANK, "ann@ta.dane.test", "dane-ta")
    assert delivered(far["ta"], "dane-ta").tls


def test_mismatching_record_defers_and_sends_nothing(relay, far) -> None:
    queue_id = send(relay, BANK, "ann@bad.dane.test", "dane-bad")
    entry = queue_entry(relay, queue_id, "deferred")
    assert "DANE authentication failed" in (entry.recipients[0].last_reply or "")
    assert not mail_from_logged(far["bad"], BANK), far["bad"].log_tail()
    assert not with_mid(far["bad"].received(), "dane-bad")
    assert f"connect from unknown[{SOURCE}]" in far["bad"].log_text()  # it did try


def test_no_tlsa_and_insecure_tlsa_are_unaffected(relay, far) -> None:
    send(relay, BANK, "ann@none.dane.test", "dane-none")
    assert delivered(far["none"], "dane-none")
    send(relay, BANK, "ann@nosig.test", "dane-nosig")  # its wrong TLSA is not DNSSEC-secure
    assert delivered(far["nosig"], "dane-nosig")


def test_in_session_probe_sees_the_dane_failure(relay, far) -> None:
    result = swaks(relay.endpoint, to="ann@reject.dane.test", mail_from=BANK)
    assert not result.ok and server_said(result.transcript, "550 5.7.10"), result.transcript
    assert "DANE authentication failed" in result.transcript
    # a rule of level dane to a host without TLSA: refused too
    result = swaks(relay.endpoint, to="ann@must.dane.test", mail_from=BANK)
    assert server_said(result.transcript, "550 5.7.10"), result.transcript
    assert "DANE required" in result.transcript


def test_tls_report_counts_the_sessions_and_validates(relay, far) -> None:
    """RFC 8460: what the tests above did, as the day's reports (``smg tls report``)."""
    import datetime as dt
    import json
    from pathlib import Path

    import jsonschema

    from tests.integration.tls_support import smg

    schema = json.loads((Path(__file__).parents[1] / "data" / "tlsrpt-schema.json").read_text())
    today = dt.datetime.now(dt.UTC).date().isoformat()
    shown = smg("tls", "report", "--config", str(relay.config_path), "--since", today)
    assert shown.returncode == 0, shown
    reports = json.loads(shown.stdout)
    for report in reports.values():
        jsonschema.validate(report, schema)
    (good,) = reports["good.dane.test"]["policies"]
    assert good["policy"]["policy-type"] == "tlsa"
    assert good["summary"]["total-successful-session-count"] >= 1
    (bad,) = reports["bad.dane.test"]["policies"]
    assert bad["summary"]["total-failure-session-count"] >= 1
    assert bad["failure-details"][0]["result-type"] == "tlsa-invalid"


def test_probe_shows_dane_and_the_in_session_answer(relay, far) -> None:
    from tests.integration.tls_support import smg

    config = str(relay.config_path)
    good = smg("tls", "probe", "good.dane.test", "--config", config)
    assert "DNSSEC: MX records secure" in good.stdout, good
    assert "DANE mx.good.dane.test 127.0.29.11: dane TLSA 3 1 1" in good.stdout
    assert "-> matches" in good.stdout
    bad = smg("tls", "probe", "reject.dane.test", "--config", config, "--from-domain",
              "bank.dane.test")  # fmt: skip
    assert "no TLSA record matches the certificate chain" in bad.stdout, bad
    assert "in-session check: 550 5.7.10" in bad.stdout
    plain = smg("tls", "probe", "nosig.test", "--config", config)
    assert "DNSSEC: MX records not secure" in plain.stdout, plain
    assert "in-session check: no in-session check" in plain.stdout
