"""The sender binding rules and the per-customer DKIM signer choice."""

from __future__ import annotations

import ipaddress

from gateway.config import TenantDefaults
from gateway.policy.chain import Action, MessageContext
from gateway.policy.rules.sender_binding import FromBindingRule, SenderBindingRule
from gateway.tenants import Tenant, TenantTable

TABLE = TenantTable(
    [
        Tenant("customer-a", ("a.example", ".sub.a.example"), TenantDefaults(),
               (ipaddress.ip_network("192.0.2.1/32"),)),
        Tenant("customer-b", ("b.example",), TenantDefaults()),
    ]
)  # fmt: skip


async def mail(sender: str, tenant: str | None = "customer-a") -> tuple[Action | None, str]:
    result = await SenderBindingRule(TABLE).evaluate(
        MessageContext(client_ip="192.0.2.1", mail_from=sender, tenant=tenant)
    )
    return result.action, str(result.reply) if result.reply else ""


async def test_envelope_sender() -> None:
    assert await mail("x@a.example") == (None, "")
    assert await mail("x@deep.sub.a.example") == (None, "")
    assert await mail("") == (None, "")  # null sender
    assert await mail("x@b.example") == (
        Action.REJECT,
        "550 5.7.1 Sender domain b.example is not registered for customer customer-a",
    )
    assert await mail("x@sub.a.example") == (
        Action.REJECT,
        "550 5.7.1 Sender domain sub.a.example is not registered for customer customer-a",
    )
    action, reply = await mail("nodomain")
    assert action == Action.REJECT and reply.startswith("553 5.1.7")
    assert await mail("x@b.example", tenant=None) == (None, "")  # untenanted: not judged


async def from_header(value: str) -> str:
    data = f"From: {value}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    ctx = MessageContext(client_ip="192.0.2.1", data=data, tenant="customer-a")
    result = await FromBindingRule(TABLE).evaluate(ctx)
    return str(result.reply) if result.reply else "ok"


async def test_from_header() -> None:
    assert await from_header("Alice <alice@a.example>") == "ok"
    assert await from_header("a@a.example, b@x.sub.a.example") == "ok"
    assert "b.example is not registered for customer customer-a" in await from_header(
        "CEO <ceo@b.example>"
    )
    assert "b.example" in await from_header("a@a.example, ceo@B.Example")
    assert (await from_header("undisclosed")).startswith("550 5.7.1")


def test_smg_explain_shows_the_tenant_and_the_binding(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from gateway.cli import main as smg

    config = tmp_path / "smg.toml"
    config.write_text(
        '[gateway]\nhostname = "gw.example.net"\nclient_networks = ["192.0.2.0/24"]\n'
        "[spam]\nenabled = false\n[virus]\nenabled = false\n"
        '[[tenants]]\nname = "customer-a"\nnetworks = ["192.0.2.1/32"]\ndomains = ["a.example"]\n'
    )
    message = tmp_path / "m.eml"
    message.write_text("From: ceo@b.example\nSubject: x\n\nbody\n")
    args = ["explain", "--config", str(config), "--from", "ceo@b.example", "--to",
            "x@far.example", "--client-ip", "192.0.2.1", str(message)]  # fmt: skip
    smg(args)
    out = capsys.readouterr().out
    assert "tenant:   customer-a" in out
    assert "sender_binding" in out and "not registered for customer customer-a" in out
    smg([*args[:-1], "--json", str(message)])
    shown = json.loads(capsys.readouterr().out)
    assert shown["tenant"] == "customer-a" and not shown["accepted"]


async def test_relay_control_with_tenants_asks_the_customers_networks() -> None:
    """smg explain's first rule answers as the intake does with [[tenants]]: a customer's
    network passes (naming the customer), auth_networks must log in (530), anyone else 554,
    whatever gateway.client_networks says."""
    from gateway.policy.rules.relay_control import RelayControlRule

    table = TenantTable(
        [Tenant("customer-a", ("a.example",), TenantDefaults(),
                (ipaddress.ip_network("198.51.100.30/32"),))],
        auth_networks=(ipaddress.ip_network("198.51.100.40/29"),),
    )  # fmt: skip
    rule = RelayControlRule([ipaddress.ip_network("198.51.100.0/24")], table)

    async def verdict(ip: str) -> tuple[Action | None, str, str]:
        result = await rule.evaluate(MessageContext(client_ip=ip))
        return result.action, str(result.reply) if result.reply else "", result.summary

    action, reply, reason = await verdict("198.51.100.30")
    assert action is None and "customer customer-a's" in reason
    action, reply, _ = await verdict("198.51.100.41")
    assert action == Action.REJECT and reply.startswith("530 5.7.0")
    action, reply, reason = await verdict("198.51.100.35")
    assert action == Action.REJECT and reply.startswith("554 5.7.1"), reply
    assert "no customer's networks" in reason
