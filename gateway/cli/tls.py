"""``smg tls probe DOMAIN``: what each MX of a domain offers, and which TLS policy applies.

For every MX (and each of its addresses): connect, EHLO, is STARTTLS offered, the TLS protocol
and cipher, the certificate's names, issuer and expiry, whether the chain is valid against the
configured CA bundle with a name matching the MX host name (checked in a second, verifying
handshake, exactly as a ``verify`` delivery does), and whether a delivery under the policy that
applies would use this MX.  Exit status: 0 every MX would be used, 1 at least one would not
(or none is usable), 2 the probe itself failed (configuration, DNS).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import socket
import ssl
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.config import Config, ConfigError, load_config, parse_config
from gateway.dns import MailHost, Resolver
from gateway.log import printable
from gateway.tls.levels import OPPORTUNISTIC, VERIFY
from gateway.tls.policy import TlsPolicy, TlsRequirement
from gateway.tls.verify import peer_chain_der

MAX_REPLY_LINES = 100


@dataclass
class Certificate:
    subject: str
    names: list[str]
    issuer: str
    not_before: str
    not_after: str
    expired: bool


@dataclass
class HostProbe:
    host: str
    preference: int
    address: str
    port: int
    banner: str = ""
    starttls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    certificate: Certificate | None = None
    chain_valid: bool | None = None
    verify_error: str = ""
    error: str = ""
    mx_listed: bool = True
    usable: bool = False
    why: str = ""


@dataclass
class DomainProbe:
    domain: str
    sender_domain: str
    requirement: dict[str, Any]
    mx_status: str = "ok"
    implicit_mx: bool = False
    hosts: list[HostProbe] = field(default_factory=list)
    error: str = ""
    dane: dict[str, Any] = field(default_factory=dict)  # gateway.cli.tls_dane.dane_status
    in_session: str = ""  # what RCPT would get under a reject rule

    @property
    def exit_code(self) -> int:
        if self.error:
            return 2
        return 0 if self.hosts and all(h.usable for h in self.hosts) else 1


# --- talking SMTP ---------------------------------------------------------------------------


class _Smtp:
    """Just enough SMTP for a probe: replies, EHLO, STARTTLS, QUIT (bounded reads)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        for _ in range(MAX_REPLY_LINES):
            raw = await self.reader.readline()
            if not raw:
                raise ConnectionError("connection closed by the server")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit():
                raise ConnectionError(f"not an SMTP reply: {line[:80]!r}")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines
        raise ConnectionError(f"reply longer than {MAX_REPLY_LINES} lines")

    async def command(self, text: str) -> tuple[int, list[str]]:
        self.writer.write(text.encode("ascii") + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def quit(self) -> None:
        try:
            await asyncio.wait_for(self.command("QUIT"), 2)
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError):
            pass  # the probe is done either way
        finally:  # also when cancelled by the caller's timeout
            self.writer.transport.abort()


async def _open(
    address: str, port: int, source: str | None, ehlo: str
) -> tuple[_Smtp, str, list[str]]:
    same_family = (
        source and ipaddress.ip_address(source).version == ipaddress.ip_address(address).version
    )
    local = (source, 0) if same_family else None  # as delivery: only within the same family
    reader, writer = await asyncio.open_connection(address, port, local_addr=local)
    smtp = _Smtp(reader, writer)
    code, banner = await smtp.reply()
    if code != 220:
        await smtp.quit()
        raise ConnectionError(f"banner {code} {' '.join(banner)}")
    code, extensions = await smtp.command(f"EHLO {ehlo}")
    if code != 250:
        await smtp.quit()
        raise ConnectionError(f"EHLO answered {code} {' '.join(extensions)}")
    return smtp, " ".join(banner), [e.split(" ")[0].upper() for e in extensions[1:]]


async def _starttls(smtp: _Smtp, context: ssl.SSLContext, host: str) -> Any:
    code, text = await smtp.command("STARTTLS")
    if code != 220:
        raise ConnectionError(f"STARTTLS answered {code} {' '.join(text)}")
    await smtp.writer.start_tls(context, server_hostname=host)
    return smtp.writer.get_extra_info("ssl_object")


# --- probing --------------------------------------------------------------------------------


def _describe_certificate(der: bytes) -> Certificate:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    now = dt.datetime.now(dt.UTC)
    return Certificate(
        subject=cert.subject.rfc4514_string(),
        names=names,
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        expired=not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc),
    )


async def probe_host(
    probe: HostProbe, requirement: TlsRequirement, ehlo: str, source: str | None
) -> None:
    """Fill ``probe`` in: one connection to look, a second one to verify as ``verify`` does."""
    smtp, probe.banner, extensions = await _open(probe.address, probe.port, source, ehlo)
    try:
        probe.starttls = "STARTTLS" in extensions
        if not probe.starttls:
            return
        looking = TlsRequirement(OPPORTUNISTIC).ssl_context()
        ssl_object = await _starttls(smtp, looking, probe.host)
        probe.tls_version, probe.cipher = ssl_object.version(), ssl_object.cipher()[0]
        chain = peer_chain_der(ssl_object)
        probe.chain_der = chain  # type: ignore[attr-defined]  # for DANE; not in the JSON
        if chain:
            probe.certificate = _describe_certificate(chain[0])
    finally:
        await smtp.quit()
    verifying = TlsRequirement(VERIFY, ca_bundle=requirement.ca_bundle).ssl_context()
    smtp, _, _ = await _open(probe.address, probe.port, source, ehlo)
    try:
        await _starttls(smtp, verifying, probe.host)
        probe.chain_valid = True
    except ssl.SSLCertVerificationError as exc:
        probe.chain_valid, probe.verify_error = False, exc.verify_message or str(exc)
    finally:
        await smtp.quit()


def judge(probe: HostProbe, requirement: TlsRequirement) -> None:
    """Would a delivery under ``requirement`` use this MX?  Sets ``usable`` and ``why``."""
    probe.mx_listed = requirement.mx_listed(probe.host)
    if probe.error:
        probe.usable, probe.why = False, f"not reachable: {probe.error}"
    elif not requirement.mx_allowed(probe.host):
        probe.usable, probe.why = False, "MX not named by the MTA-STS policy"
    elif not requirement.requires_tls:
        encrypted = "with TLS" if probe.tls_version else "IN THE CLEAR (no STARTTLS)"
        probe.usable, probe.why = True, f"opportunistic: would deliver {encrypted}"
    elif not probe.starttls or not probe.tls_version:
        probe.usable, probe.why = False, "no STARTTLS: nothing would be sent"
    elif probe.tls_version not in ("TLSv1.2", "TLSv1.3"):
        probe.usable, probe.why = False, f"{probe.tls_version} is below TLS 1.2"
    elif requirement.level == VERIFY and not probe.chain_valid:
        probe.usable, probe.why = False, f"certificate not valid: {probe.verify_error}"
    else:
        probe.usable, probe.why = True, f"{requirement.level}: would deliver"
    if requirement.testing and not (probe.mx_listed and probe.chain_valid):
        probe.why += " (MTA-STS testing: enforce would refuse this MX)"


async def probe_domain(
    config: Config,
    resolver: Resolver,
    domain: str,
    sender_domain: str = "",
    port: int | None = None,
    timeout: float = 10.0,
) -> DomainProbe:
    tls_policy = TlsPolicy(config, resolver)
    requirement = await tls_policy.requirement(sender_domain, domain)
    result = DomainProbe(domain, sender_domain, _requirement_dict(requirement))
    mail_hosts = await resolver.mail_hosts(domain)
    result.mx_status, result.implicit_mx = mail_hosts.status, mail_hosts.implicit
    if mail_hosts.status != "ok":
        result.error = f"MX lookup for {domain}: {mail_hosts.status} {mail_hosts.detail}".strip()
        return result
    if mail_hosts.null_mx:
        result.error = f"{domain} publishes a null MX: it accepts no mail"
        return result
    for mail_host in mail_hosts.hosts:
        result.hosts += await _probe_addresses(
            config, resolver, mail_host, requirement, port, timeout
        )
    from gateway.cli import tls_dane

    result.dane = await tls_dane.dane_status(resolver, domain, result.hosts)
    result.in_session = await tls_dane.in_session_answer(
        config, resolver, domain, sender_domain, timeout
    )
    return result


async def _probe_addresses(
    config: Config,
    resolver: Resolver,
    mail_host: MailHost,
    requirement: TlsRequirement,
    port: int | None,
    timeout: float,
) -> list[HostProbe]:
    port = port or config.delivery.port
    found = await resolver.addresses(mail_host.host)
    addresses = [r.address for r in found.records] if found.status == "ok" else []
    if not addresses:
        probe = HostProbe(mail_host.host, mail_host.preference, "", port)
        probe.error = f"no address ({found.status})"
        judge(probe, requirement)
        return [probe]
    probes = []
    for address in addresses:
        probe = HostProbe(mail_host.host, mail_host.preference, address, port)
        try:
            await asyncio.wait_for(
                probe_host(
                    probe, requirement, config.gateway.hostname, config.gateway.source_address
                ),
                timeout,
            )
        except TimeoutError:
            probe.error = f"timed out after {timeout:g}s"
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            probe.error = str(exc) or type(exc).__name__
        judge(probe, requirement)
        probes.append(probe)
    return probes


def _requirement_dict(requirement: TlsRequirement) -> dict[str, Any]:
    data = asdict(requirement)
    data["ca_bundle"] = str(requirement.ca_bundle) if requirement.ca_bundle else None
    data["mx_patterns"] = list(requirement.mx_patterns)
    return data


# --- output ---------------------------------------------------------------------------------


def render_text(result: DomainProbe) -> str:
    req = result.requirement
    lines = [
        f"domain {result.domain}"
        + (f" from {result.sender_domain}" if result.sender_domain else "")
    ]
    policy = f"  policy: {req['level']}"
    if req["on_failure"]:
        policy += f", on failure {req['on_failure']}"
    policy += f" ({req['source']})"
    lines.append(policy)
    if req["mx_patterns"]:
        lines.append(f"  MTA-STS mx: {' '.join(req['mx_patterns'])}")
    if result.error:
        lines.append(f"  error: {result.error}")
    for probe in result.hosts:
        lines += _render_host(probe)
    if result.dane:
        from gateway.cli import tls_dane

        lines += tls_dane.render(result.dane, result.in_session)
    # The far end's banner, names and errors: escaped for the operator's terminal.
    return "\n".join(printable(line) for line in lines)


def _render_host(probe: HostProbe) -> list[str]:
    where = f"{probe.address}:{probe.port}" if probe.address else "no address"
    lines = [f"MX {probe.preference} {probe.host} ({where})"]
    if probe.error:
        lines.append(f"  error: {probe.error}")
    else:
        lines.append(f"  banner: {probe.banner}")
        lines.append(f"  STARTTLS: {'offered' if probe.starttls else 'NOT offered'}")
    if probe.tls_version:
        lines.append(f"  TLS: {probe.tls_version} {probe.cipher}")
    cert = probe.certificate
    if cert:
        lines.append(f"  certificate: {', '.join(cert.names) or cert.subject}")
        expiry = "EXPIRED" if cert.expired else "valid until"
        lines.append(f"    issuer {cert.issuer}; {expiry} {cert.not_after}")
    if probe.chain_valid is not None:
        verdict = "valid, name matches" if probe.chain_valid else f"NOT valid: {probe.verify_error}"
        lines.append(f"  chain: {verdict}")
    lines.append(f"  verdict: {probe.why}")
    return lines


# --- the command ----------------------------------------------------------------------------


def _probe_config(path: str | None) -> Config:
    if path:
        return load_config(path)
    hostname = socket.getfqdn()
    if "." not in hostname or hostname.endswith(".localdomain"):
        hostname = "localhost.localdomain"
    return parse_config({"gateway": {"hostname": hostname, "role": "bad"}}, "<defaults>")


def run_probe(args: argparse.Namespace) -> int:
    try:
        config = _probe_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    from gateway.dns import Resolver

    resolver = Resolver(config.dns)
    domain = args.domain.strip().rstrip(".").lower()
    result = asyncio.run(
        probe_domain(config, resolver, domain, args.from_domain or "", args.port, args.timeout)
    )
    if args.json:
        print(json.dumps(asdict(result) | {"exit_code": result.exit_code}, indent=2))
    else:
        print(render_text(result))
    return result.exit_code


def register(subparsers: Any) -> None:
    tls = subparsers.add_parser("tls", help="forced TLS and MTA-STS tools")
    tls_commands = tls.add_subparsers(dest="tls_command", metavar="TLS_COMMAND", required=True)
    probe = tls_commands.add_parser(
        "probe",
        help="what each MX of a domain offers and which TLS policy applies",
        description=__doc__.split("\n\n")[1],
    )
    probe.add_argument("domain", metavar="DOMAIN", help="the recipient domain to probe")
    probe.add_argument("--config", metavar="FILE", help="relay config (DNS, CA bundle, rules)")
    probe.add_argument("--port", type=int, help="SMTP port (default: delivery.port)")
    probe.add_argument(
        "--from-domain", metavar="DOMAIN", help="sender domain, for sender-specific rules"
    )
    probe.add_argument("--timeout", type=float, default=10.0, help="seconds per MX address")
    probe.add_argument("--json", action="store_true", help="machine-readable output")
    probe.set_defaults(handler=run_probe)
    from gateway.cli import tls_report

    tls_report.register(tls_commands)
