"""``smg tls probe`` (the real command line) against real Postfix far ends, knot DNS serving the
MX records and an HTTPS server serving an MTA-STS policy.

- 127.0.26.11 ``mx1.probe.test``: STARTTLS, valid certificate;
- 127.0.26.12 ``mx2.probe.test``: no STARTTLS;
- 127.0.26.13 ``mx3.probe.test``: certificate for another name;
- 127.0.26.14 ``mx4.probe.test``: expired certificate;
- 127.0.26.20: the MTA-STS policy server of ``sts.probe.test``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS, TestCA
from tests.harness.postfix import PostfixFarEnd
from tests.integration.smg_relay import base_config
from tests.integration.tls_support import (
    PolicyServer,
    TlsRelay,
    common_port,
    smg,
    started_far_ends,
)

pytestmark = pytest.mark.integration

ZONE = "probe.test"
SOURCE = "127.0.26.5"
HTTPS = "127.0.26.20"
FAR_ENDS = {  # MX name: (address, tls)
    "mx1": ("127.0.26.11", "valid"),
    "mx2": ("127.0.26.12", "none"),
    "mx3": ("127.0.26.13", "wrong-name"),
    "mx4": ("127.0.26.14", "expired"),
}
ZONE_TEXT = f"""
@        MX 10 mx1
@        MX 20 mx2
@        MX 30 mx3
@        MX 40 mx4
good     MX 10 mx1
sts      MX 10 mx1
sts      MX 20 mx3
mta-sts.sts A {HTTPS}
_mta-sts.sts TXT "v=STSv1; id=p1"
mx1      A 127.0.26.11
mx2      A 127.0.26.12
mx3      A 127.0.26.13
mx4      A 127.0.26.14
"""
POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.probe.test\r\nmax_age: 3600\r\n"
RULES = [
    {"sender": "*", "recipient": ZONE, "level": "encrypt", "on_failure": "hold"},
    {"sender": "bank.example", "recipient": ZONE, "level": "verify", "on_failure": "reject"},
]


@pytest.fixture(scope="module")
def port() -> int:
    return common_port(*(a for a, _ in FAR_ENDS.values()), SOURCE)


@pytest.fixture(scope="module")
def far(port: int, test_ca: TestCA, knot_dns: KnotDNS) -> Iterator[dict[str, PostfixFarEnd]]:
    require_binaries("postfix")
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    with started_far_ends(FAR_ENDS, port, test_ca, lambda name: f"{name}.{ZONE}") as started:
        yield started


@pytest.fixture(scope="module")
def https(test_ca: TestCA) -> Iterator[PolicyServer]:
    server = PolicyServer(test_ca.valid(f"mta-sts.sts.{ZONE}").server_context(), HTTPS)
    server.body = POLICY
    yield server
    server.close()


@pytest.fixture(scope="module")
def config_path(knot_dns, test_ca, https, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("probe")
    config = base_config(tmp, knot_dns.nameserver, hostname="gw.smg-test.example")
    config["gateway"]["source_address"] = SOURCE
    config["tls_policy"] = {"ca_bundle": str(test_ca.ca_bundle)}
    config["mta_sts"] = {"https_port": https.port, "ca_bundle": str(test_ca.ca_bundle)}
    relay = TlsRelay(tmp, config, RULES)  # only to write the TOML: the relay is not started
    relay.write_config()
    return relay.config_path


def probe(config_path: Path, port: int, *args: str):
    started = time.monotonic()
    result = smg("tls", "probe", *args, "--config", str(config_path), "--port", str(port))
    return result, time.monotonic() - started


def test_probe_reports_each_mx_and_the_policy(far, config_path, port) -> None:
    result, took = probe(config_path, port, ZONE, "--from-domain", "bank.example")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr  # some MX would not be used
    assert "policy: verify, on failure reject (tls_policy.rules[1]" in out
    sections = {name: out.split(f"{name}.{ZONE} (")[1].split("\nMX ")[0] for name in FAR_ENDS}
    assert (
        "STARTTLS: offered" in sections["mx1"] and "chain: valid, name matches" in sections["mx1"]
    )
    assert "TLSv1.3" in sections["mx1"] and "verdict: verify: would deliver" in sections["mx1"]
    assert "STARTTLS: NOT offered" in sections["mx2"] and "nothing would be sent" in sections["mx2"]
    assert "certificate: wrong-name.invalid" in sections["mx3"]
    assert "NOT valid: Hostname mismatch" in sections["mx3"]
    assert "EXPIRED" in sections["mx4"] and "certificate has expired" in sections["mx4"]
    assert took < 15
    # Nothing was sent: the far ends saw EHLO and STARTTLS, never MAIL FROM.
    for daemon in far.values():
        assert "from=<" not in daemon.log_text()


def test_sender_specific_rule_and_json(far, config_path, port) -> None:
    result, _ = probe(config_path, port, ZONE, "--json")
    data = json.loads(result.stdout)
    assert data["requirement"]["level"] == "encrypt" and data["exit_code"] == 1
    usable = {h["host"]: h["usable"] for h in data["hosts"]}
    # encrypt takes any certificate: only the MX without STARTTLS would not be used
    assert usable == {f"mx1.{ZONE}": True, f"mx2.{ZONE}": False, f"mx3.{ZONE}": True,
                      f"mx4.{ZONE}": True}  # fmt: skip
    mx1 = next(h for h in data["hosts"] if h["host"] == f"mx1.{ZONE}")
    assert mx1["certificate"]["names"] == [f"mx1.{ZONE}"] and mx1["chain_valid"] is True


def test_mta_sts_policy_is_shown_and_unlisted_mx_flagged(far, config_path, port, https) -> None:
    result, _ = probe(config_path, port, f"sts.{ZONE}")
    out = result.stdout
    assert "policy: verify, on failure hold (mta-sts enforce id=p1)" in out, out + result.stderr
    assert f"MTA-STS mx: mx1.{ZONE}" in out
    assert "MX not named by the MTA-STS policy" in out and result.returncode == 1


def test_all_good_exits_0_and_a_missing_domain_exits_2(far, config_path, port) -> None:
    good, _ = probe(config_path, port, f"good.{ZONE}")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "policy: opportunistic (default)" in good.stdout
    missing, _ = probe(config_path, port, f"nowhere.{ZONE}")
    assert missing.returncode == 2 and "nxdomain" in missing.stdout
