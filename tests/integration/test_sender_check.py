"""Sender domain check against the real ``smg serve`` process and a real knot DNS server.

Zones use 127.0.0.x addresses, made "public" by ``dns.extra_public_networks = 127.0.0.0/8``;
10.x addresses stay private.  The client is swaks.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS
from tests.harness.swaks import swaks
from tests.integration.smg_relay import SMG, SmgRelay, base_config, server_said, to_toml

pytestmark = pytest.mark.integration

ZONE = "sender-check.test"
ZONE_TEXT = """
mx-ok       MX 10 mail.mx-ok
mail.mx-ok  A 127.0.0.20
a-only      A 127.0.0.21
aaaa-only   AAAA 2a00:1450:4001::1
null-mx     MX 0 .
null-mx     A 127.0.0.22
private     A 10.9.9.9
private-mx  MX 10 mail.private-mx
mail.private-mx A 192.168.7.7
txt-only    TXT "v=spf1 -all"
rcpt        MX 10 mail.rcpt
mail.rcpt   A 127.0.0.23
"""
BROKEN_ZONE = "sender-broken.test"


def d(name: str) -> str:
    return f"{name}.{ZONE}"


@pytest.fixture(scope="module")
def zones(knot_dns: KnotDNS) -> KnotDNS:
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    knot_dns.set_zone(BROKEN_ZONE, "@ A 127.0.0.24\n")
    knot_dns.servfail_zone(BROKEN_ZONE)
    return knot_dns


@pytest.fixture(scope="module")
def relay(zones: KnotDNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmgRelay]:
    require_binaries("swaks")
    tmp = tmp_path_factory.mktemp("sender-check")
    relay = SmgRelay(tmp, base_config(tmp, zones.nameserver))
    relay.start()
    yield relay
    relay.stop()


@pytest.mark.parametrize(
    ("sender", "expect"),
    [
        (f"alice@{d('mx-ok')}", "250 2.1.0"),
        (f"alice@{d('a-only')}", "250 2.1.0"),
        (f"alice@{d('aaaa-only')}", "250 2.1.0"),
        ("<>", "250 2.1.0"),
        (f"alice@{d('nothing-here')}", "550 5.1.8 Sender Domain must resolve"),
        (f"alice@{d('null-mx')}", "550 5.1.8 Sender Domain must resolve"),
        (f"alice@{d('private')}", "550 5.1.8 Sender Domain must resolve"),
        (f"alice@{d('private-mx')}", "550 5.1.8 Sender Domain must resolve"),
        (f"alice@{d('txt-only')}", "550 5.1.8 Sender Domain must resolve"),
        (f"alice@{BROKEN_ZONE}", "451 4.4.3"),
    ],
)
def test_sender_domain_verdict_over_smtp(relay: SmgRelay, sender: str, expect: str) -> None:
    before = len(relay.queued())
    result = swaks(relay.endpoint, to=f"bob@{d('rcpt')}", mail_from=sender)
    assert server_said(result.transcript, expect), result.transcript
    queued = len(relay.queued()) - before
    assert queued == (1 if expect.startswith("250") else 0)


def test_dns_timeout_is_451_never_550(knot_dns: KnotDNS, tmp_path: Path) -> None:
    """Every lookup times out (a nameserver that never answers): 451 4.4.3."""
    with knot_dns.dead_nameserver() as dead:
        config = base_config(tmp_path, dead.nameserver)
        config["dns"]["timeout"] = "1s"
        relay = SmgRelay(tmp_path, config)
        relay.start()
        try:
            result = swaks(relay.endpoint, to="bob@example.net", mail_from=f"a@{d('mx-ok')}")
            assert server_said(result.transcript, "451 4.4.3 Sender domain"), result.transcript
            null = swaks(relay.endpoint, to=f"bob@{d('rcpt')}", mail_from="<>")
            assert null.ok, null.transcript
        finally:
            relay.stop()


@pytest.mark.parametrize(
    ("target", "code", "text"),
    [
        (d("mx-ok"), 0, "accept"),
        (f"someone@{d('a-only')}", 0, "accept"),
        ("<>", 0, "accept"),
        (d("nothing-here"), 1, "reject: 550 5.1.8 Sender Domain must resolve"),
        (d("null-mx"), 1, "null MX"),
        (d("private"), 1, "only non-public addresses 10.9.9.9"),
        (BROKEN_ZONE, 2, "tempfail: 451 4.4.3"),
    ],
)
def test_check_sender_command(
    zones: KnotDNS, tmp_path: Path, target: str, code: int, text: str
) -> None:
    config_path = tmp_path / "smg.toml"
    config_path.write_text(to_toml(base_config(tmp_path, zones.nameserver)))
    proc = subprocess.run(
        [*SMG, "check-sender", target, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert text in proc.stdout
