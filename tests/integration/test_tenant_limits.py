"""The customers' limits and suspension against the real ``smg serve`` with two workers:
hourly messages and sessions shared by the workers (tenants.sqlite), suspension by the reject
share (a host sending as other customers' domains), the ops notice once, the suspension
surviving a restart, ``smg tenant`` on the live relay, resume restarting the window."""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS, free_port, wait_for
from tests.integration.smg_relay import SMG, SmgRelay, base_config
from tests.integration.test_tenants import RCPT, ZONE, ZONE_TEXT, A, B, C, client, send

pytestmark = pytest.mark.integration
OPS = f"ops@{A}"


@pytest.fixture(scope="module")
def relay(knot_dns: KnotDNS, tmp_path_factory) -> Iterator[SmgRelay]:
    require_binaries("knotd")
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    tmp = tmp_path_factory.mktemp("tenant-limits")
    config = base_config(tmp, knot_dns.nameserver, workers=2, operations_mailbox=OPS,
                         metrics_listen=f"127.0.0.1:{free_port('127.0.0.1')}")  # fmt: skip
    config["tenants"] = [
        {"name": "customer-a", "networks": ["127.0.0.1/32"], "domains": [A],
         "limits": {"messages_per_hour": 3, "max_sessions": 2, "max_sessions_per_ip": 2}},
        {"name": "customer-b", "networks": ["127.0.0.5/32"], "domains": [B]},
        {"name": "customer-c", "networks": ["127.0.0.6/32"], "domains": [C],
         "limits": {"suspend_min_messages": 5, "suspend_reject_share": 0.8}},
    ]  # fmt: skip
    relay = SmgRelay(tmp, config)
    relay.start()
    yield relay
    relay.stop()


def smg(relay: SmgRelay, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SMG, "tenant", *args, "--config", str(relay.config_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def scrape(relay: SmgRelay) -> str:
    import urllib.request

    host, port = relay.config["gateway"]["metrics_listen"].rsplit(":", 1)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_hourly_messages_across_workers_and_sessions(relay: SmgRelay) -> None:
    for n in range(3):  # one connection each: the kernel spreads them over the two workers
        with client(relay, "127.0.0.1") as smtp:
            assert send(smtp, f"alice@{A}", f"limit-{n}") == "250"
    with client(relay, "127.0.0.1") as smtp:
        reply = send(smtp, f"alice@{A}", "limit-3")
    assert reply.startswith("451 4.7.1 Customer customer-a reached its limit of 3 messages"), reply
    assert "retry after" in reply
    with client(relay, "127.0.0.5") as smtp:  # the other customer in the same minute
        assert send(smtp, f"bob@{B}", "b-same-minute") == "250"
    held = [client(relay, "127.0.0.1"), client(relay, "127.0.0.1")]
    try:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            client(relay, "127.0.0.1")
        assert info.value.smtp_code == 421 and b"customer-a" in info.value.smtp_error
        with client(relay, "127.0.0.5") as smtp:  # A holding its slots does not stop B
            assert smtp.noop()[0] == 250
    finally:
        for smtp in held:
            smtp.close()
    shown = json.loads(smg(relay, "show", "customer-a", "--json").stdout)
    assert shown["last_hour"]["messages"] == 3
    # worker 0's /metrics counts what both workers accepted (gateway.metrics_share)
    accepted = 'smg_tenant_messages_accepted_total{tenant="customer-a"} 3'
    wait_for(lambda: accepted in scrape(relay), 15, what=f"{accepted} in /metrics")


def test_suspension_notice_restart_and_resume(relay: SmgRelay) -> None:
    with client(relay, "127.0.0.6") as smtp:
        for n in range(5):  # a hijacked host sending as another customer
            assert send(smtp, f"ceo@{A}", f"spoof-{n}").startswith("550 5.7.1")
            smtp.rset()
        reply = send(smtp, f"relay@{C}", "after-suspension")
    assert reply == "451 4.7.1 Customer customer-c is suspended", reply
    notices = [m for m in relay.queued() if [r.address for r in m.recipients] == [OPS]]
    assert len(notices) == 1
    listed = json.loads(smg(relay, "list", "--json").stdout)
    assert [t["name"] for t in listed if t["suspended"]] == ["customer-c"]
    relay.stop()
    relay.start()
    with client(relay, "127.0.0.6") as smtp:  # survives the restart
        assert (
            send(smtp, f"relay@{C}", "after-restart")
            == "451 4.7.1 Customer customer-c is suspended"
        )
    result = smg(relay, "resume", "customer-c", "--reason", "host cleaned")
    assert result.returncode == 0 and "resumed" in result.stdout, result.stderr
    with client(relay, "127.0.0.6") as smtp:  # the old window does not suspend it again
        assert send(smtp, f"relay@{C}", "after-resume") == "250"
        assert send(smtp, f"relay@{C}", "after-resume-2") == "250"
    notices = [m for m in relay.queued() if [r.address for r in m.recipients] == [OPS]]
    assert len(notices) == 1
    audit = (relay.tmp / "spool" / "audit.log").read_text()
    assert '"action": "tenant.resume"' in audit and "host cleaned" in audit
    assert RCPT
