"""A tiny in-process authoritative DNS server over UDP for unit tests (a fake neighbour).

Integration tests use the real knot server from tests/harness; this one answers from a dict so
unit tests can make any answer, count queries, SERVFAIL or stay silent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

SOA = "ns.test. hostmaster.test. 1 3600 600 86400 {minimum}"


@dataclass
class FakeZone:
    """``records[name][rdtype] = [text, ...]``; ``ttl`` for every record."""

    records: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    ttl: int = 300
    soa_minimum: int = 60
    soa_ttl: int = 3600
    servfail: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, rdtype: str, *texts: str) -> None:
        self.records.setdefault(name.rstrip(".").lower(), {}).setdefault(rdtype, []).extend(texts)

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if name in self.refused:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        by_type = self.records.get(name)
        if by_type is None or not by_type.get(rdtype):
            if by_type is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            soa = dns.rrset.from_text(
                "test.", self.soa_ttl, "IN", "SOA", SOA.format(minimum=self.soa_minimum)
            )
            response.authority.append(soa)
            return response
        rrset = dns.rrset.from_text_list(question.name, self.ttl, "IN", rdtype, by_type[rdtype])
        response.answer.append(rrset)
        return response


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: FakeZone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        response = self.zone.answer(dns.message.from_wire(data))
        if response is not None and self.transport is not None:
            self.transport.sendto(response.to_wire(), addr)


async def start_fake_dns(
    zone: FakeZone, host: str = "127.0.0.1"
) -> tuple[asyncio.BaseTransport, int]:
    """Serve ``zone`` on a free UDP port of ``host``; returns (transport, port)."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Protocol(zone), local_addr=(host, 0)
    )
    port = transport.get_extra_info("sockname")[1]
    return transport, port
