"""The tenant at the intake: identity at connect, the verdict header's tenant= between the
gateways."""

from __future__ import annotations

import ipaddress

from gateway.config import RoutingSection, TenantDefaults
from gateway.intake.handler import PolicyHandler
from gateway.metrics import Metrics
from gateway.policy.chain import Chain, MessageContext
from gateway.policy.rules.verdict import VerdictRule, format_verdict, parse_verdict
from gateway.tenants import Tenant, TenantTable

VERDICT = {"is_spam": True, "score": 15.0, "required": 6.0, "action": "reject",
           "symbols": {"GTUBE": 15.0}, "source": "rspamd"}  # fmt: skip


def handler(tenants: TenantTable) -> PolicyHandler:
    loopback = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.1.0.0/16")]
    return PolicyHandler(Chain([]), None, loopback, Metrics(), tenants)  # type: ignore[arg-type]


TABLE = TenantTable(
    [
        Tenant(
            "customer-a",
            ("a.example",),
            TenantDefaults(),
            (ipaddress.ip_network("198.51.100.30/32"),),
        )
    ],
    [ipaddress.ip_network("198.51.100.40/29")],
)


def test_identity_at_connect() -> None:
    h = handler(TABLE)
    refusal, tenant = h.identify("198.51.100.30")
    assert refusal is None and tenant is not None and tenant.name == "customer-a"
    assert h.identify("::ffff:198.51.100.30")[1] == tenant
    assert h.identify("198.51.100.41") == (None, None)  # auth_networks: must log in
    assert h.identify("127.0.0.1") == (None, None)  # loopback in client_networks
    refusal, tenant = h.identify("10.1.2.3")  # client_networks are not customers
    assert refusal is not None and refusal.startswith("554 5.7.1") and tenant is None
    assert h.identify("198.51.100.99")[0].startswith("554 5.7.1")  # type: ignore[union-attr]


def test_without_tenants_client_networks_as_before() -> None:
    h = handler(TenantTable(()))
    assert h.identify("10.1.2.3") == (None, None)
    assert h.identify("198.51.100.30")[0].startswith("554 5.7.1")  # type: ignore[union-attr]


def test_verdict_header_carries_the_tenant() -> None:
    text = format_verdict(VERDICT, "gw1.example.net", "customer-a")  # type: ignore[arg-type]
    assert "by=gw1.example.net; tenant=customer-a; symbols=GTUBE:15" in text
    parsed = parse_verdict(text)
    assert parsed is not None and parsed[0].get("tenant") == "customer-a"
    assert "tenant" not in parse_verdict(format_verdict(VERDICT, "gw1.example.net"))[0]  # type: ignore[index,arg-type]
    assert parse_verdict(text.replace("customer-a", "Bad Name")) is None


async def test_the_bad_gateway_trusts_the_tenant_from_a_good_gateway() -> None:
    rule = VerdictRule(RoutingSection(good_gateways=["192.0.2.10"]), "bad")
    header = format_verdict(VERDICT, "gw1.example.net", "customer-a")  # type: ignore[arg-type]
    data = f"X-SMG-Verdict: {header}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    trusted = MessageContext(client_ip="192.0.2.10", data=data)
    await rule.evaluate(trusted)
    assert trusted.tenant == "customer-a"
    stranger = MessageContext(client_ip="192.0.2.99", data=data)
    await rule.evaluate(stranger)
    assert stranger.tenant is None
