"""``smg explain``: what this gateway would do with a message, and why, without sending it.

Runs the MAIL, RCPT and DATA stages of the real chain (the same rules ``smg serve`` builds from
the same config, asking the real clamd, rspamd and DNS) on a message file, then prints each
rule's verdict, the outcome (rejected / delivered via this gateway / rerouted to the bad
gateway / held), the DKIM key(s) that would sign and the TLS policy each recipient would get.
Nothing is queued or sent.  Exit status: 0 the message would be accepted (delivered, rerouted
or held), 1 it would be refused (rejected or temporarily refused), 2 explain itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError, load_config
from gateway.log import printable
from gateway.policy.build import build_chain
from gateway.policy.chain import Action, Chain, Decision, MessageContext, RuleResult, Stage
from gateway.policy.cleanup import Cleanup
from gateway.services import Services, build_services
from gateway.tenants import TenantTable

_REFUSING = {Action.REJECT, Action.TEMPFAIL}
_OUTCOMES = {
    Action.ACCEPT: "delivered via this gateway",
    Action.REROUTE: "rerouted to the bad gateway",
    Action.HOLD: "held",
    Action.REJECT: "rejected",
    Action.TEMPFAIL: "rejected (temporary failure)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain", help="run the policy chain on a message without sending it"
    )
    parser.add_argument("--config", required=True, help="the relay's configuration file")
    parser.add_argument("--from", dest="mail_from", required=True, help="envelope sender")
    parser.add_argument("--to", dest="rcpt_tos", action="append", required=True,
                        help="envelope recipient (repeat for several)")  # fmt: skip
    parser.add_argument("--client-ip", default="127.0.0.1", help="the SMTP client's address")
    parser.add_argument("--helo", default="explain.invalid", help="the SMTP client's HELO name")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("message", type=Path, help="the message file (.eml)")
    parser.set_defaults(handler=cmd_explain)


@dataclass
class Step:
    stage: str
    rule: str
    action: str
    summary: str
    reply: str = ""
    recipient: str = ""

    @classmethod
    def of(cls, stage: Stage, result: RuleResult, recipient: str = "") -> Step:
        return cls(
            str(stage),
            result.rule,
            str(result.action) if result.action else "-",
            result.summary,
            str(result.reply) if result.reply else "",
            recipient,
        )


@dataclass
class Explanation:
    gateway: str
    role: str
    mail_from: str
    client_ip: str
    steps: list[Step] = field(default_factory=list)
    outcome: str = ""
    reply: str = ""
    refused_recipients: dict[str, str] = field(default_factory=dict)
    recipients: list[str] = field(default_factory=list)
    dkim: list[str] = field(default_factory=list)
    tls: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tenant: str = ""  # the customer of client_ip ([[tenants]] networks), "" for none

    @property
    def accepted(self) -> bool:
        return self.outcome in (_OUTCOMES[Action.ACCEPT], _OUTCOMES[Action.REROUTE], "held")


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    try:
        data = args.message.read_bytes()
    except OSError as exc:
        print(f"smg explain: {args.message}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        explanation = asyncio.run(explain(config, args, to_crlf(data)))
    except (OSError, ValueError) as exc:  # a DKIM key, a TLS file: what serve would refuse
        print(f"smg explain: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_as_dict(explanation), indent=2))
    else:
        print(render(explanation))
    return 0 if explanation.accepted else 1


def to_crlf(data: bytes) -> bytes:
    """A message file as it arrives over SMTP: CRLF line ends."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def explain(config: Config, args: argparse.Namespace, data: bytes) -> Explanation:
    # The services smg serve builds, without a spool (nothing can be queued), and its chain
    # with the relay control the intake checks at connect shown as the first MAIL rule.
    services = build_services(config)
    chain = build_chain(config, services, relay_control=True)
    cleanup = Cleanup(services)
    result = Explanation(config.gateway.hostname, config.gateway.role, args.mail_from,
                         args.client_ip)  # fmt: skip
    found = TenantTable.from_config(config).by_address(args.client_ip)
    result.tenant = found.name if found else ""
    ctx = MessageContext(client_ip=args.client_ip, helo=args.helo, mail_from=args.mail_from,
                         tenant=found.name if found else None)  # fmt: skip
    try:
        await _run(chain, ctx, args.rcpt_tos, data, result)
        if result.accepted:
            result.dkim = cleanup.signing_keys(ctx) or ["none (no key for the From: domain)"]
            await _tls(config, services, ctx, result)
        elif ctx.facts.get("virus") and ctx.mail_from:
            result.notes.append(await _notice_note(cleanup, ctx))
    finally:
        if services.rspamd is not None:
            await services.rspamd.close()
    return result


async def _notice_note(cleanup: Cleanup, ctx: MessageContext) -> str:
    """Whether the virus notice would go out (the rule of docs/policy.md), and why."""
    check = await cleanup.notice_check(ctx)
    if check.allowed:
        return f"an information NDR naming the virus would go to {ctx.mail_from} ({check.reason})"
    return f"no information NDR to {ctx.mail_from}: {check.reason}"


async def _run(
    chain: Chain, ctx: MessageContext, rcpts: list[str], data: bytes, result: Explanation
) -> None:
    decision = await chain.run(Stage.MAIL, ctx)
    result.steps += [Step.of(Stage.MAIL, r) for r in decision.results]
    if _refused(decision, result):
        return
    for rcpt in rcpts:
        ctx.rcpt_tos.append(rcpt)
        decision = await chain.run(Stage.RCPT, ctx)
        result.steps += [Step.of(Stage.RCPT, r, rcpt) for r in decision.results]
        if decision.action in _REFUSING:
            ctx.rcpt_tos.pop()
            result.refused_recipients[rcpt] = str(decision.reply or decision.action)
    result.recipients = list(ctx.rcpt_tos)
    if not ctx.rcpt_tos:
        result.outcome = _OUTCOMES[Action.REJECT]
        result.reply = "no recipient accepted"
        return
    ctx.data = data
    decision = await chain.run(Stage.DATA, ctx)
    result.steps += [Step.of(Stage.DATA, r) for r in decision.results]
    if not _refused(decision, result):
        result.outcome = _OUTCOMES[decision.action]


def _refused(decision: Decision, result: Explanation) -> bool:
    if decision.action not in _REFUSING:
        return False
    result.outcome = _OUTCOMES[decision.action]
    result.reply = str(decision.reply) if decision.reply else ""
    return True


async def _tls(
    config: Config, services: Services, ctx: MessageContext, result: Explanation
) -> None:
    if result.outcome == _OUTCOMES[Action.REROUTE]:
        hosts = ", ".join(f"{h}:{p}" for h, p in config.routing.bad_gateways) or "(none set)"
        ca = config.routing.internal_ca or "the system CAs"
        text = f"verify, to the bad gateway(s) {hosts}, against {ca}"
        result.tls = {rcpt: text for rcpt in ctx.rcpt_tos}
        return
    for rcpt in ctx.rcpt_tos:
        domain = rcpt.rpartition("@")[2]
        if services.tls_policy is None:
            result.tls[rcpt] = "opportunistic"
            continue
        try:
            requirement = await services.tls_policy.requirement(ctx.sender_domain, domain)
        except Exception as exc:  # MTA-STS lookups may fail: say so rather than guess
            result.tls[rcpt] = f"unknown: {exc}"
            continue
        result.tls[rcpt] = requirement.describe()


def render(x: Explanation) -> str:
    lines = [
        f"gateway:  {x.gateway} (role {x.role})",
        f"envelope: <{x.mail_from}> from client {x.client_ip}",
        *([f"tenant:   {x.tenant}"] if x.tenant else []),
        "",
    ]
    width = max([len(s.rule) for s in x.steps] + [4])
    for step in x.steps:
        where = f"{step.stage.upper():<5}"
        target = f" [{step.recipient}]" if step.recipient else ""
        line = f"  {where} {step.rule:<{width}}  {step.action:<9} {step.summary}{target}"
        lines.append(line + (f"  -> {step.reply}" if step.reply else ""))
    lines += ["", f"outcome:  {x.outcome}" + (f": {x.reply}" if x.reply else "")]
    for rcpt, reply in x.refused_recipients.items():
        lines.append(f"refused:  {rcpt}: {reply}")
    if x.accepted:
        lines.append(f"DKIM:     {x.dkim[0]}")
        lines += [f"          {key}" for key in x.dkim[1:]]
        for rcpt, tls in x.tls.items():
            lines.append(f"TLS:      {rcpt}: {tls}")
    lines += [f"note:     {note}" for note in x.notes]
    # The envelope, rule summaries and replies quote the message and the far ends: escaped.
    return "\n".join(printable(line) for line in lines)


def _as_dict(x: Explanation) -> dict[str, Any]:
    return {
        "gateway": x.gateway,
        "role": x.role,
        "mail_from": x.mail_from,
        "client_ip": x.client_ip,
        "tenant": x.tenant or None,
        "steps": [vars(s) for s in x.steps],
        "outcome": x.outcome,
        "accepted": x.accepted,
        "reply": x.reply,
        "recipients": x.recipients,
        "refused_recipients": x.refused_recipients,
        "dkim": x.dkim if x.accepted else [],
        "tls": x.tls,
        "notes": x.notes,
    }
