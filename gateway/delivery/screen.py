"""Which addresses delivery may connect to: no internal targets, no loop through ourselves.

A customer chooses the recipient domains, and so the MX records we follow: without these rules
a domain whose MX points at ``127.0.0.1`` or ``10.0.0.5`` makes the gateway talk SMTP to hosts
inside our own networks (SSRF), or hand the mail back to its own listener.  Every rule is
decided before a connection is opened, on data we already have (no extra lookup):

- An MX host that is an address literal (``127.0.0.1``, ``[10.0.0.5]``, ``[IPv6:::1]``, or any
  name whose last label is all digits) is not a host name: RFC 5321 5.1 says the MX RDATA is a
  domain name, never an address literal, and RFC 1123 2.1 that a host name's top label is never
  numeric.  Postfix likewise refuses such a name before any lookup ("malformed" name service
  error).  It is neither looked up nor dialled.
- An address that is not public (:meth:`gateway.dns.Resolver.is_public`: global unicast, or
  inside ``dns.extra_public_networks``) is not dialled on the direct route.  The bad-gateway
  route (``routing.bad_gateways``) is our own fleet and is exempt.
- An address and port the relay listens on (``gateway.listen``; a wildcard address such as
  ``0.0.0.0`` covers every address of this host) is never dialled, whatever
  ``extra_public_networks`` says: the mail would loop back to ourselves (Postfix: "mail for X
  loops back to myself", 5.4.6).

A domain whose every MX host is refused this way bounces at once (permanent: the DNS says so,
and retrying would only try the same internal hosts again): status 5.4.4 for literals and
non-public addresses, 5.4.6 for a loop.  If some addresses pass, only those are used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from dataclasses import dataclass
from typing import Protocol

from gateway.dns import IpAddress, unmapped

NOT_ROUTABLE = "5.4.4"  # RFC 3463: unable to route (no usable next hop)
LOOP = "5.4.6"  # RFC 3463: routing loop detected


class PublicRule(Protocol):
    def is_public(self, ip: str) -> bool: ...


@dataclass(frozen=True)
class Refusal:
    """Why one host or address is not used; ``enhanced`` is the RFC 3463 status if it bounces."""

    reason: str
    enhanced: str = NOT_ROUTABLE


def address_literal(host: str) -> bool:
    """True if the MX target ``host`` is written as an address rather than a host name."""
    text = host.strip().rstrip(".")
    if text.startswith("[") or text.endswith("]"):
        return True  # [1.2.3.4] and [IPv6:...]: the address-literal syntax of RFC 5321 4.1.3
    if ":" in text:
        return True  # an IPv6 address; ':' is in no host name
    top = text.rpartition(".")[2]
    return top.isdigit()  # 127.0.0.1, 10.1, 192.168.0.1.5: no top-level domain is numeric


def literal_refusal(host: str, domain: str) -> Refusal:
    return Refusal(
        f"MX host {host} of {domain} is an address literal, not a host name (RFC 5321 5.1): "
        "malformed name, not looked up and not connected to"
    )


class Screen:
    """Answers "may delivery connect to this address and port?" for one configuration."""

    def __init__(self, public: PublicRule, listen: list[tuple[str, int]]) -> None:
        self._public = public
        self._own: set[tuple[IpAddress, int]] = set()
        self._wildcard_ports: set[int] = set()
        for host, port in listen:
            self._add_listener(host, port)

    def _add_listener(self, host: str, port: int) -> None:
        try:
            address = _normal(host)
        except ValueError:  # a name such as "localhost": every local address on that port
            self._wildcard_ports.add(port)
            return
        if address.is_unspecified:
            self._wildcard_ports.add(port)
        else:
            self._own.add((address, port))

    def refusal(
        self, domain: str, host: str, ip: str, port: int, *, public_only: bool
    ) -> Refusal | None:
        """None if ``ip``:``port`` (an address of ``host``, a next hop for ``domain``) may be
        dialled; else why not.  ``public_only`` is false for the bad-gateway route, which is
        our own fleet (the loop rule still holds)."""
        try:
            address = _normal(ip)
        except ValueError:
            return Refusal(f"host {host} has an invalid address {ip!r}")
        if self.loops_back(address, port):
            return Refusal(
                f"mail for {domain} loops back to myself: host {host} address {ip} port {port} "
                "is this relay's own listener (gateway.listen)",
                LOOP,
            )
        if public_only and not self._public.is_public(str(address)):
            return Refusal(
                f"host {host} has address {ip}, which is not public (internal, loopback or "
                "reserved; see dns.extra_public_networks): not connected to"
            )
        return None

    def loops_back(self, address: IpAddress, port: int) -> bool:
        if (address, port) in self._own:
            return True
        return port in self._wildcard_ports and _is_local(address)


def _normal(text: str) -> IpAddress:
    return unmapped(ipaddress.ip_address(text.strip().strip("[]")))


def _is_local(address: IpAddress) -> bool:
    """True if ``address`` belongs to this host.  Binding a datagram socket to it succeeds only
    for a local address (EADDRNOTAVAIL otherwise): exact, and no packet is sent."""
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with contextlib.closing(socket.socket(family, socket.SOCK_DGRAM)) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True
