"""Authoritative DNS for tests: knotd run by hand with its own config, rundir and storage."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from devkit import knot_zone

from .util import Daemon, HarnessError, free_port, run, wait_for

# The harness rewrites each zone's SOA serial so a reload is always seen as a change.
_DEFAULT_TTL = 300
_BROKEN_ZONE = "; broken on purpose by the test harness: knot answers SERVFAIL\n@@@ (\n"


class KnotDNS(Daemon):
    """knotd serving `zones` ({name: zone text}) on `address`:<free port>, UDP and TCP.

    With `catch_all_root=True` (default) the harness also serves an empty root zone, so any
    name outside the configured zones gets NXDOMAIN (instead of REFUSED), like the internet.
    Zone texts may omit SOA/NS and $TTL: the harness adds them, and always sets the serial.
    """

    name = "knotd"

    def __init__(
        self,
        zones: dict[str, str] | None = None,
        address: str = "127.0.0.53",
        catch_all_root: bool = True,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.address = address
        self.port: int | None = None
        self.catch_all_root = catch_all_root
        self.config_path = self.dir / "knot.conf"
        self.control_socket = self.dir / "run" / "knot.sock"
        self.zone_dir = self.dir / "zones"
        self._zones: dict[str, str] = {}  # fqdn -> zone text as written
        self._serial = int(time.time())
        self._dead: list[DeadNameserver] = []
        self._signed: set[str] = set()  # zones knot signs itself (DNSSEC, default policy)
        for zone_dir in ("run", "db", "zones"):
            (self.dir / zone_dir).mkdir(exist_ok=True)
        if catch_all_root:
            self._write_zone(".", "")
        for zone, text in (zones or {}).items():
            self._write_zone(zone, text)

    # -- public API ---------------------------------------------------------------------------
    @property
    def nameserver(self) -> str:
        """ "127.0.0.x:port" of this server."""
        assert self.port is not None, "start() first"
        return f"{self.address}:{self.port}"

    @property
    def zones(self) -> list[str]:
        return sorted(self._zones)

    def set_zone(self, zone: str, text: str, timeout: float = 10.0) -> int:
        """Add or replace `zone` with `text`, reload it and wait until it is served.

        Returns the SOA serial now served.
        """
        fqdn = _fqdn(zone)
        new_zone = fqdn not in self._zones
        serial = self._write_zone(fqdn, text)
        if not self.running:
            return serial
        if new_zone:
            self._reload_config()
        elif "error" in self.knotc("zone-reload", fqdn, check=False).lower():
            # A purged (SERVFAIL) zone cannot be zone-reloaded; a config reload loads it.
            self._reload_config()
        wait_for(
            lambda: self.served_serial(fqdn) == serial, timeout, what=f"{fqdn} serial {serial}"
        )
        return serial

    def sign_zone(self, zone: str) -> None:
        """Have knot sign ``zone`` automatically (``dnssec-signing: on``, its default policy:
        ECDSA P-256, keys made in its KASP database); call before ``set_zone``/``start``."""
        self._signed.add(_fqdn(zone))
        if self.running:
            self._reload_config()

    def trust_anchor(self, zone: str, timeout: float = 10.0) -> str:
        """The KSK of a signed ``zone`` as a DNSKEY record, for a resolver's trust anchor."""

        def ksk() -> str | None:
            for rrset in self.query(_fqdn(zone), "DNSKEY").answer:
                for key in rrset:
                    if rrset.rdtype == dns.rdatatype.DNSKEY and key.flags == 257:
                        return f"{_fqdn(zone)} DNSKEY {key.to_text()}"
            return None

        return wait_for(ksk, timeout, what=f"the KSK of {zone}")

    def servfail_zone(self, zone: str, timeout: float = 10.0) -> None:
        """Make `zone` answer SERVFAIL: a configured zone whose file is broken and whose
        loaded copy is purged (knot keeps serving the old copy on a failed reload)."""
        fqdn = _fqdn(zone)
        new_zone = fqdn not in self._zones
        self._zone_file(fqdn).write_text(_BROKEN_ZONE)
        self._zones[fqdn] = _BROKEN_ZONE
        if self.running:
            if new_zone:
                self._reload_config()
            else:
                self.knotc("-f", "zone-purge", fqdn)
            wait_for(
                lambda: self.rcode(fqdn, "SOA") == dns.rcode.SERVFAIL,
                timeout,
                what=f"{fqdn} to answer SERVFAIL",
            )

    def remove_zone(self, zone: str) -> None:
        """Stop serving `zone` (names under it then fall to the root zone: NXDOMAIN)."""
        fqdn = _fqdn(zone)
        self._zones.pop(fqdn, None)
        self._zone_file(fqdn).unlink(missing_ok=True)
        if self.running:
            self._reload_config()

    def query(self, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
        """One query to this server (no recursion, no retries), 2 s timeout."""
        assert self.port is not None, "start() first"
        request = dns.message.make_query(name, rdtype)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(request, self.address, port=self.port, timeout=2.0)

    def rcode(self, name: str, rdtype: str = "A") -> int:
        return self.query(name, rdtype).rcode()

    def served_serial(self, zone: str) -> int | None:
        """The SOA serial served for `zone`, or None if it is not served."""
        try:
            reply = self.query(_fqdn(zone), "SOA")
        except (OSError, dns.exception.DNSException):
            return None
        for rrset in reply.answer:
            if rrset.rdtype == dns.rdatatype.SOA:
                return int(rrset[0].serial)
        return None

    def knotc(self, *args: str, check: bool = True) -> str:
        """Run knotc against this server's control socket."""
        return run(["knotc", "-s", str(self.control_socket), "-t", "5", *args], check=check)

    def dead_nameserver(self, address: str | None = None) -> DeadNameserver:
        """A nameserver address that never answers (closed with this server)."""
        dead = DeadNameserver(address or self.address)
        self._dead.append(dead)
        return dead

    # -- Daemon hooks -------------------------------------------------------------------------
    def _forget_ports(self) -> None:
        self.port = None

    def _prepare(self) -> None:
        if self.port is None:
            self.port = free_port(self.address)
        self._write_config()

    def _command(self) -> list[str]:
        return ["knotd", "-c", str(self.config_path)]

    def _ready(self) -> bool:
        if not self.control_socket.exists():
            return False
        # Ready once every zone with content serves its serial (or SERVFAILs when broken).
        for fqdn, text in self._zones.items():
            if text == _BROKEN_ZONE:
                continue
            if self.served_serial(fqdn) is None:
                return False
        self.query(".", "SOA")  # any answer (REFUSED without a root zone) proves it listens
        return True

    def close(self) -> None:
        for dead in self._dead:
            dead.close()
        self._dead.clear()
        super().close()

    # -- internals ----------------------------------------------------------------------------
    def _zone_file(self, fqdn: str) -> Path:
        return self.zone_dir / ("root.zone" if fqdn == "." else f"{fqdn}zone")

    def _write_zone(self, zone: str, text: str) -> int:
        fqdn = _fqdn(zone)
        self._serial += 1
        rendered = _render_zone(fqdn, text, self._serial)
        tmp = self._zone_file(fqdn).with_suffix(".tmp")
        tmp.write_text(rendered)
        tmp.replace(self._zone_file(fqdn))  # atomic: knot never reads half a file
        self._zones[fqdn] = rendered
        return self._serial

    def _write_config(self) -> None:
        zones = "".join(
            f'  - domain: "{fqdn}"\n    file: "{self._zone_file(fqdn)}"\n'
            + ("    dnssec-signing: on\n    journal-content: changes\n"
               if fqdn in self._signed else "")
            for fqdn in self._zones
        )  # fmt: skip
        self.config_path.write_text(
            f"""# written by tests/harness/knot.py
server:
    rundir: "{self.dir / "run"}"
    listen: {self.address}@{self.port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "{self.dir / "db"}"
control:
    listen: "{self.control_socket}"
log:
  - target: "{self.log_path}"
    any: info
template:
  - id: default
    storage: "{self.zone_dir}"
    journal-content: none
    zonefile-sync: -1
    zonefile-load: whole
    semantic-checks: off
zone:
{zones or "  []"}
"""
        )

    def _reload_config(self) -> None:
        self._write_config()
        self.knotc("reload")


def _fqdn(zone: str) -> str:
    return zone if zone.endswith(".") else zone + "."


def _render_zone(fqdn: str, text: str, serial: int) -> str:
    """Zone text with $TTL, an SOA (serial set to `serial`) and NS at the apex."""
    host = "test." if fqdn == "." else fqdn
    return knot_zone.render_zone(
        fqdn,
        text,
        serial,
        ttl=_DEFAULT_TTL,
        nameserver=f"ns.{host}",
        hostmaster=f"hostmaster.{host}",
        negative_ttl=60,
        error=HarnessError,
    )


class DeadNameserver:
    """An address:port that accepts DNS traffic and never answers: a bound UDP socket whose
    datagrams are read and dropped, and a TCP listener that never accepts (connects hang)."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.port = free_port(address)
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((address, self.port))
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.bind((address, self.port))
        self._tcp.listen(16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drop, name="dead-ns", daemon=True)
        self._thread.start()

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    def _drop(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._udp], [], [], 0.2)
            if readable:
                with contextlib.suppress(OSError):
                    self._udp.recv(65535)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._udp.close()
        self._tcp.close()

    def __enter__(self) -> DeadNameserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
