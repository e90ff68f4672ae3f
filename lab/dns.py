"""The lab's DNS: knotd run by hand on 198.51.100.1:53, authoritative for the lab zones.

Tests edit zones while the lab is up, from any process (as root):

    from lab import dns
    dns.set_zone("partner-new.example", "@ MX 10 mx.partner-tls.example.\\n")
    dns.list_ip("198.51.100.12")      # on the DNSBL dnsbl.lab.example
    dns.unlist_ip("198.51.100.12")
    dns.remove_zone("partner-new.example")

Every change is validated before it is written (a bad zone raises ZoneError and the served zone
stays as it was), reloaded with knotc, and the call returns only once knotd serves the new SOA
serial (bounded wait). A root zone "." makes names outside every lab zone answer NXDOMAIN, as
on the internet, instead of REFUSED.
"""

from __future__ import annotations

import fcntl
import ipaddress
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataset
import dns.rdatatype
import dns.zone

from devkit import knot_zone
from lab.config import DNS_ADDR, DNS_PORT, DNSBL_ZONE, DOMAIN, RUN_DIR
from lab.proc import LabError, daemon_pid, run, start_daemon, stop_daemon, wait_until
from lab.zones import DEFAULT_TTL, SIGNED_ZONES, default_zones

DNS_DIR = RUN_DIR / "dns"
ZONE_DIR = DNS_DIR / "zones"
CONFIG = DNS_DIR / "knot.conf"
CONTROL_SOCKET = DNS_DIR / "run" / "knot.sock"
LOCK = DNS_DIR / "zones.lock"
DAEMON = "knotd"
NS_NAME = f"ns1.{DOMAIN}."


class ZoneError(LabError):
    """A zone text that does not parse, or a change knotd did not take."""


# -- the daemon -----------------------------------------------------------------------------------


def start(*, timeout: float = 20) -> None:
    """Write the default zones and the config, start knotd, wait until every zone is served."""
    for sub in ("run", "db", "zones"):
        (DNS_DIR / sub).mkdir(parents=True, exist_ok=True)
    _write_zone(".", "")
    for zone, text in default_zones().items():
        _write_zone(zone, text)
    _write_config()
    start_daemon(DAEMON, ["knotd", "-c", CONFIG])

    def ready() -> bool:
        if daemon_pid(DAEMON) is None:
            raise LabError("knotd exited; see lab/run/logs/knotd.log")
        return CONTROL_SOCKET.exists() and all(_serves(z, _file_serial(z)) for z in zones())

    wait_until("knotd to serve the lab zones", ready, timeout=timeout, interval=0.1)


def stop() -> None:
    stop_daemon(DAEMON)


def knotc(*args: str, check: bool = True) -> str:
    done = run(["knotc", "-c", CONFIG, "-s", CONTROL_SOCKET, "-t", "5", *args], check=check)
    return done.stdout + done.stderr


# -- the zone API ---------------------------------------------------------------------------------


def zones() -> list[str]:
    """The zones served, as FQDNs ("." is the catch-all root)."""
    return sorted(_zone_name(p) for p in ZONE_DIR.glob("*.zone"))


def zone_text(zone: str) -> str:
    """The zone as served (full names, with SOA and NS)."""
    path = _zone_file(_fqdn(zone))
    if not path.exists():
        raise ZoneError(f"no lab zone {_fqdn(zone)}")
    return path.read_text()


def set_zone(zone: str, text: str, *, timeout: float = 10) -> int:
    """Add or replace a zone from zone-file text (origin = zone; SOA, NS and $TTL optional).

    Returns the SOA serial served once knotd has it.
    """
    fqdn = _fqdn(zone)
    with _locked():
        _require_running()
        is_new = not _zone_file(fqdn).exists()
        previous = None if is_new else _zone_file(fqdn).read_text()
        serial = _write_zone(fqdn, text)
        try:
            if is_new or "error" in knotc("zone-reload", fqdn, check=False).lower():
                _reload_config()
            wait_until(
                f"knotd to serve {fqdn} serial {serial}",
                lambda: _serves(fqdn, serial),
                timeout=timeout,
            )
        except LabError as exc:
            _restore(fqdn, previous)
            raise ZoneError(f"knotd did not take zone {fqdn}: {exc}") from exc
        return serial


def remove_zone(zone: str, *, timeout: float = 10) -> None:
    """Stop serving a zone: its names then fall to the root zone (NXDOMAIN)."""
    fqdn = _fqdn(zone)
    if fqdn == ".":
        raise ZoneError("the root zone is what makes unknown names NXDOMAIN: keep it")
    with _locked():
        _require_running()
        _zone_file(fqdn).unlink(missing_ok=True)
        _reload_config()
        wait_until(f"{fqdn} to go", lambda: served_serial(fqdn) is None, timeout=timeout)


def list_ip(
    address: str,
    *,
    zone: str = DNSBL_ZONE,
    code: str = "127.0.0.2",
    reason: str = "listed by the lab",
) -> int:
    """Put an IPv4 address on a DNSBL zone (A = code, TXT = reason). Returns the new serial."""
    owner = _dnsbl_owner(address, zone)
    z = _parsed(zone)
    z.replace_rdataset(owner, _rdataset("A", code))
    z.replace_rdataset(owner, _rdataset("TXT", '"' + reason.replace('"', "'") + '"'))
    return set_zone(zone, z.to_text(relativize=False))


def unlist_ip(address: str, *, zone: str = DNSBL_ZONE) -> int:
    """Take an IPv4 address off a DNSBL zone (no error if it was not listed)."""
    owner = _dnsbl_owner(address, zone)
    z = _parsed(zone)
    z.delete_node(owner)
    return set_zone(zone, z.to_text(relativize=False))


def listed_ips(zone: str = DNSBL_ZONE) -> list[str]:
    """Addresses listed on a DNSBL zone (the reversed owner names turned back to addresses)."""
    z = _parsed(zone)
    origin = dns.name.from_text(_fqdn(zone))
    found = []
    for name in z.nodes:
        labels = name.relativize(origin).labels if name.is_subdomain(origin) else ()
        if len(labels) == 4:
            found.append(".".join(label.decode() for label in reversed(labels)))
    return sorted(found, key=ipaddress.ip_address)


def query(name: str, rdtype: str = "A", *, tcp: bool = False) -> dns.message.Message:
    """One query to the lab DNS (no retries, 2 s timeout)."""
    request = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(request, DNS_ADDR, port=DNS_PORT, timeout=2.0)


def served_serial(zone: str) -> int | None:
    """The SOA serial knotd serves for zone, or None if it does not serve it."""
    fqdn = _fqdn(zone)
    try:
        reply = query(fqdn, "SOA")
    except (OSError, dns.exception.DNSException):
        return None
    for rrset in reply.answer:
        if rrset.rdtype == dns.rdatatype.SOA and rrset.name == dns.name.from_text(fqdn):
            return int(rrset[0].serial)
    return None


def signed(zone: str) -> bool:
    return _fqdn(zone) in {_fqdn(z) for z in SIGNED_ZONES}


def trust_anchors(timeout: float = 20) -> list[str]:
    """The KSK of every signed lab zone as a DNSKEY line (knot makes the keys at its first
    start; the gateways' unbound gets them as trust anchors through the inventory)."""
    anchors = []
    for zone in SIGNED_ZONES:
        fqdn = _fqdn(zone)

        def ksk(fqdn: str = fqdn) -> str | None:
            for rrset in query(fqdn, "DNSKEY").answer:
                for key in rrset:
                    if rrset.rdtype == dns.rdatatype.DNSKEY and key.flags == 257:
                        return f"{fqdn} DNSKEY {key.to_text()}"
            return None

        wait_until(f"the KSK of {fqdn}", lambda ksk=ksk: ksk() is not None, timeout=timeout)
        anchors.append(ksk() or "")
    return anchors


# -- internals ------------------------------------------------------------------------------------


def _serves(zone: str, serial: int | None) -> bool:
    """knotd serves ``zone`` at ``serial``; a signed zone at it or later (signing bumps it)."""
    served = served_serial(zone)
    if served is None or serial is None:
        return False
    return served >= serial if signed(zone) else served == serial


@contextmanager
def _locked() -> Iterator[None]:
    """Zone edits from several test processes at once go one at a time (bounded wait)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        for _ in range(300):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
        else:
            raise LabError(f"could not lock {LOCK} within 30 s")
        yield


def _require_running() -> None:
    if daemon_pid(DAEMON) is None:
        raise LabError("the lab DNS is not running: `python -m lab up` first")


def _fqdn(zone: str) -> str:
    zone = zone.strip().lower()
    return zone if zone.endswith(".") else zone + "."


def _zone_file(fqdn: str) -> Path:
    return ZONE_DIR / ("root.zone" if fqdn == "." else f"{fqdn}zone")


def _zone_name(path: Path) -> str:
    return "." if path.name == "root.zone" else path.name.removesuffix("zone")


def _file_serial(zone: str) -> int | None:
    try:
        z = dns.zone.from_file(str(_zone_file(_fqdn(zone))), origin=_fqdn(zone), relativize=False)
    except (OSError, dns.exception.DNSException):
        return None
    return int(z.get_soa().serial)


def _parsed(zone: str) -> dns.zone.Zone:
    fqdn = _fqdn(zone)
    return dns.zone.from_text(zone_text(fqdn), origin=fqdn, relativize=False)


def _next_serial(fqdn: str) -> int:
    """Strictly increasing, and never behind the clock (so a re-created zone still moves up)."""
    served = served_serial(fqdn) if signed(fqdn) and daemon_pid(DAEMON) else None
    return max(int(time.time()), (_file_serial(fqdn) or 0) + 1, (served or 0) + 1)


def _write_zone(zone: str, text: str) -> int:
    fqdn = _fqdn(zone)
    serial = _next_serial(fqdn)
    rendered = render_zone(fqdn, text, serial)
    path = _zone_file(fqdn)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rendered)
    tmp.replace(path)  # atomic: knotd never reads half a file
    return serial


def _restore(fqdn: str, previous: str | None) -> None:
    if previous is None:
        _zone_file(fqdn).unlink(missing_ok=True)
        _reload_config()
    else:
        _zone_file(fqdn).write_text(previous)
        knotc("zone-reload", fqdn, check=False)


def render_zone(fqdn: str, text: str, serial: int) -> str:
    """Zone text with $TTL, an SOA carrying serial, and NS at the apex; ZoneError if bad."""
    return knot_zone.render_zone(
        fqdn,
        text,
        serial,
        ttl=DEFAULT_TTL,
        nameserver=NS_NAME,
        hostmaster=f"hostmaster.{DOMAIN}.",
        negative_ttl=DEFAULT_TTL,
        error=ZoneError,
    )


def _rdataset(rdtype: str, rdata: str) -> dns.rdataset.Rdataset:
    return dns.rdataset.from_text("IN", rdtype, DEFAULT_TTL, rdata)


def _dnsbl_owner(address: str, zone: str) -> str:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError as exc:
        raise ZoneError(f"not an IPv4 address: {address!r}") from exc
    return ".".join(reversed(str(ip).split("."))) + "." + _fqdn(zone)


def _write_config() -> None:
    # Signed zones: knot signs them itself (its default policy, keys in its KASP database).
    signing = "    dnssec-signing: on\n    journal-content: changes\n"
    entries = "".join(
        f'  - domain: "{z}"\n    file: "{_zone_file(z)}"\n' + (signing if signed(z) else "")
        for z in zones()
    )
    CONFIG.write_text(
        f"""# Written by lab/dns.py: the lab's authoritative DNS (knotd run by hand).
server:
    rundir: "{DNS_DIR / "run"}"
    listen: {DNS_ADDR}@{DNS_PORT}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "{DNS_DIR / "db"}"
control:
    listen: "{CONTROL_SOCKET}"
log:
  - target: stderr
    any: info
template:
  - id: default
    storage: "{ZONE_DIR}"
    journal-content: none
    zonefile-sync: -1
    zonefile-load: whole
    semantic-checks: off
zone:
{entries}"""
    )


def _reload_config() -> None:
    _write_config()
    knotc("reload")
