"""MTA-STS (RFC 8461) through the real ``smg serve``: knot DNS serves the ``_mta-sts`` TXT records
and the MX records, a local HTTPS server (certificate from the tests' CA for every
``mta-sts.<domain>``) serves the policies, real Postfix far ends take the mail.

- 127.0.25.11 ``mx.enforce.sts.test``: valid certificate, named by the enforce policies;
- 127.0.25.12 ``mx.rogue.sts.test``: valid certificate, but named by no policy;
- 127.0.25.13 ``mx.badcert.sts.test``: certificate for another name, named by its policy;
- 127.0.25.14 ``mx.plain.sts.test``: no STARTTLS (the testing-mode domain's MX);
- 127.0.25.20: the HTTPS policy server.  The relay sends from 127.0.25.5.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS, TestCA, wait_for
from tests.harness.postfix import PostfixFarEnd
from tests.integration.smg_relay import SmgRelay, base_config
from tests.integration.tls_support import (
    PolicyServer,
    common_port,
    mail_from_logged,
    queue_entry,
    send,
    started_far_ends,
    with_mid,
)

pytestmark = pytest.mark.integration

ZONE = "sts.test"
SOURCE = "127.0.25.5"
HTTPS = "127.0.25.20"
SENDER = f"carol@shop.{ZONE}"
FAR_ENDS = {
    "enforce": ("127.0.25.11", "valid"),
    "rogue": ("127.0.25.12", "valid"),
    "badcert": ("127.0.25.13", "wrong-name"),
    "plain": ("127.0.25.14", "none"),
}
# domain: (MX names in preference order, policy mode, policy mx lines)
DOMAINS = {
    "enforce": (["mx.enforce"], "enforce", ["mx.enforce.sts.test"]),
    "mixed": (["mx.rogue", "mx.enforce"], "enforce", ["*.enforce.sts.test", "mx.enforce.sts.test"]),
    "onlyrogue": (["mx.rogue"], "enforce", ["mx.enforce.sts.test"]),
    "badcert": (["mx.badcert"], "enforce", ["mx.badcert.sts.test"]),
    "testing": (["mx.plain"], "testing", ["mx.enforce.sts.test"]),
}


def zone_text(refresh_id: str = "r1") -> str:
    lines = ["shop MX 10 mx.customer", "mx.customer A 127.0.25.10"]
    lines += [f"mx.{name} A {address}" for name, (address, _) in FAR_ENDS.items()]
    for domain, (mx_hosts, _, _) in DOMAINS.items():
        lines += [f"{domain} MX {10 * (i + 1)} {host}" for i, host in enumerate(mx_hosts)]
        lines.append(f'_mta-sts.{domain} TXT "v=STSv1; id=20261127{domain}"')
        lines.append(f"mta-sts.{domain} A {HTTPS}")
    # the refresh test changes this id: a 1 s TTL so the relay's resolver sees it soon
    lines += ["refresh MX 10 mx.enforce", f"mta-sts.refresh A {HTTPS}"]
    lines.append(f'_mta-sts.refresh 1 TXT "v=STSv1; id={refresh_id}"')
    return "\n".join(lines) + "\n"


def policy_text(mode: str, mx: list[str]) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return "\r\n".join(lines) + "\r\n"


@pytest.fixture(scope="module")
def port() -> int:
    return common_port(*(a for a, _ in FAR_ENDS.values()), SOURCE)


@pytest.fixture(scope="module")
def zone(knot_dns: KnotDNS) -> KnotDNS:
    knot_dns.set_zone(ZONE, zone_text())
    return knot_dns


@pytest.fixture(scope="module")
def https(test_ca: TestCA) -> Iterator[PolicyServer]:
    names = [f"mta-sts.{domain}.{ZONE}" for domain in [*DOMAINS, "refresh"]]
    server = PolicyServer(test_ca.valid(*names).server_context(), HTTPS)
    for domain, (_, mode, mx) in DOMAINS.items():
        server.bodies[f"mta-sts.{domain}.{ZONE}"] = policy_text(mode, mx)
    server.bodies[f"mta-sts.refresh.{ZONE}"] = policy_text("enforce", ["mx.enforce.sts.test"])
    server.body = "no policy here"
    yield server
    server.close()


@pytest.fixture(scope="module")
def far(port: int, test_ca: TestCA) -> Iterator[dict[str, PostfixFarEnd]]:
    require_binaries("postfix", "swaks")
    with started_far_ends(FAR_ENDS, port, test_ca, lambda name: f"mx.{name}.{ZONE}") as started:
        yield started


@pytest.fixture(scope="module")
def relay(zone, port, far, https, test_ca, tmp_path_factory) -> Iterator[SmgRelay]:
    tmp = tmp_path_factory.mktemp("mta-sts")
    config = base_config(tmp, zone.nameserver, hostname="gw.smg-test.example")
    config["gateway"]["source_address"] = SOURCE
    config["delivery"] = {
        "port": port,
        "retry_initial": "1h",
        "scan_interval": "200ms",
        "connect_timeout": "3s",
    }
    config["tls_policy"] = {"ca_bundle": str(test_ca.ca_bundle), "hold_retry": "1h"}
    config["mta_sts"] = {
        "enabled": True,
        "https_port": https.port,
        "ca_bundle": str(test_ca.ca_bundle),
        "fetch_timeout": "5s",
    }
    relay = SmgRelay(tmp, config)
    relay.start()
    yield relay
    relay.stop()


def log_lines(relay: SmgRelay, needle: str) -> list[str]:
    return [x for x in relay.log_path.read_text().splitlines() if needle in x]


def test_enforce_policy_forces_verified_tls(relay, far, https) -> None:
    send(relay, SENDER, f"dan@enforce.{ZONE}", "sts-enforce")
    got = wait_for(lambda: with_mid(far["enforce"].received(), "sts-enforce"), 20, what="mail")
    assert got[0].tls
    line = wait_for(lambda: log_lines(relay, f"<dan@enforce.{ZONE}>"), 10, what="log")[-1]
    assert "verify=verified" in line and "status=sent" in line
    assert https.requests >= 1


def test_an_mx_the_policy_does_not_name_is_never_used(relay, far) -> None:
    send(relay, SENDER, f"dan@mixed.{ZONE}", "sts-mixed")
    got = wait_for(lambda: with_mid(far["enforce"].received(), "sts-mixed"), 20, what="mail")
    assert got[0].tls
    # The preferred MX (mx.rogue) is not in the policy: the relay did not even connect to it.
    assert f"connect from unknown[{SOURCE}]" not in far["rogue"].log_text()


def test_no_listed_mx_holds_the_mail(relay, far) -> None:
    queue_id = send(relay, SENDER, f"dan@onlyrogue.{ZONE}", "sts-onlyrogue")
    held = queue_entry(relay, queue_id, "held")
    assert "mta-sts enforce" in (held.recipients[0].last_reply or "")
    assert not mail_from_logged(far["rogue"], SENDER)


def test_a_certificate_that_does_not_verify_holds_the_mail(relay, far) -> None:
    queue_id = send(relay, SENDER, f"dan@badcert.{ZONE}", "sts-badcert")
    held = queue_entry(relay, queue_id, "held")
    assert "certificate verify failed" in (held.recipients[0].last_reply or "")
    assert not mail_from_logged(far["badcert"], SENDER), far["badcert"].log_tail()


def test_testing_mode_delivers_and_logs_what_enforce_would_refuse(relay, far) -> None:
    send(relay, SENDER, f"dan@testing.{ZONE}", "sts-testing")
    got = wait_for(lambda: with_mid(far["plain"].received(), "sts-testing"), 20, what="mail")
    assert not got[0].tls  # delivered although the MX offers no TLS and is not in the policy
    lines = wait_for(lambda: len(x := log_lines(relay, "mta_sts_testing")) >= 2 and x, 10)
    assert all(f"mx=mx.plain.{ZONE}" in x and "mta-sts testing" in x for x in lines)
    assert any("MX not listed in the policy" in x for x in lines)
    assert any('problem="no TLS"' in x for x in lines)  # enforce would refuse the cleartext


def test_policy_is_cached_refreshed_on_a_new_id_and_kept_when_a_refresh_fails(
    relay, far, https, zone
) -> None:
    host = f"mta-sts.refresh.{ZONE}"
    for mid in ("sts-refresh-1", "sts-refresh-2"):
        send(relay, SENDER, f"dan@refresh.{ZONE}", mid)
        wait_for(lambda mid=mid: with_mid(far["enforce"].received(), mid), 20, what=mid)
    assert https.hosts_asked.count(host) == 1  # the second delivery used the cached policy
    # A new id and a policy that names another MX: fetched again, so the mail is held now.
    https.bodies[host] = policy_text("enforce", ["mx.elsewhere.sts.test"])
    zone.set_zone(ZONE, zone_text("r2"))
    time.sleep(1.5)  # the TXT record's TTL
    queue_id = send(relay, SENDER, f"dan@refresh.{ZONE}", "sts-refresh-3")
    assert "id=r2" in (queue_entry(relay, queue_id, "held").recipients[0].last_reply or "")
    assert https.hosts_asked.count(host) == 2
    # Another new id, but the policy server fails: the cached policy (r2) stays in force.
    https.statuses[host] = 500
    zone.set_zone(ZONE, zone_text("r3"))
    time.sleep(1.5)
    queue_id = send(relay, SENDER, f"dan@refresh.{ZONE}", "sts-refresh-4")
    assert "id=r2" in (queue_entry(relay, queue_id, "held").recipients[0].last_reply or "")
    assert https.hosts_asked.count(host) == 3
    assert log_lines(relay, "refresh failed (https://mta-sts.refresh.sts.test/.well-known")
