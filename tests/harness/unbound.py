"""A validating resolver for tests: unbound run by hand, forwarding to the tests' knot.

``Unbound(stubs={".": knot.nameserver}, anchors=[knot.trust_anchor("dane.test")])``: every
name is resolved at the stub servers (``stub-zone``: iterative queries to them, as to
authoritative servers), answers below an anchor are DNSSEC-validated (AD set when secure,
SERVFAIL when bogus), everything else is insecure.  Listens on ``address``:<free port>.
"""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.query

from .util import Daemon, free_port


class Unbound(Daemon):
    name = "unbound"

    def __init__(
        self,
        stubs: dict[str, str],
        anchors: list[str],
        address: str = "127.0.0.54",
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.stubs = stubs  # zone -> "ip:port" of an authoritative server
        self.anchors = anchors
        self.address = address
        self.port: int | None = None
        self.config_path = self.dir / "unbound.conf"

    @property
    def nameserver(self) -> str:
        assert self.port is not None, "start() first"
        return f"{self.address}:{self.port}"

    def query(self, name: str, rdtype: str = "A") -> dns.message.Message:
        """One query with DO and AD set, as the relay asks."""
        assert self.port is not None, "start() first"
        request = dns.message.make_query(name, rdtype, want_dnssec=True)
        request.flags |= dns.flags.AD
        return dns.query.udp(request, self.address, port=self.port, timeout=3.0)

    def _forget_ports(self) -> None:
        self.port = None

    def _prepare(self) -> None:
        if self.port is None:
            self.port = free_port(self.address)
        stubs = "".join(
            f'stub-zone:\n  name: "{zone}"\n  stub-addr: {where.replace(":", "@")}\n'
            for zone, where in self.stubs.items()
        )
        anchors = "".join(f'  trust-anchor: "{anchor}"\n' for anchor in self.anchors)
        self.config_path.write_text(
            f"""# written by tests/harness/unbound.py
server:
  interface: {self.address}@{self.port}
  port: {self.port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{self.dir}"
  pidfile: "{self.dir / "unbound.pid"}"
  use-syslog: no
  logfile: "{self.log_path}"
  verbosity: 1
  val-log-level: 2
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  module-config: "validator iterator"
  qname-minimisation: no
  harden-dnssec-stripped: yes
  cache-max-ttl: 5
  cache-max-negative-ttl: 5
  num-threads: 1
  local-zone: "test." nodefault
{anchors}remote-control:
  control-enable: no
{stubs}"""
        )

    def _command(self) -> list[str]:
        return ["unbound", "-d", "-c", str(self.config_path)]

    def _ready(self) -> bool:
        self.query(".", "SOA")
        return True
