"""testinfra: the gateway hosts are what the inventory says (docs/deploy.md).

Against the lab (default; the fixtures of tests/infra/conftest.py):

    .venv/bin/pytest tests/infra/test_gateways.py

Against production (or any inventory), over SSH with paramiko:

    SMG_INVENTORY=inventories/production.py [SMG_SSH_CONFIG=~/.ssh/config] \
        .venv/bin/pytest tests/infra/test_gateways.py

Every expectation comes from the validated inventory: the role, the addresses, the relay
config byte for byte, the DKIM keys, which host runs the blacklist monitor.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import testinfra
from cryptography import x509

from deploykit.certificates import certificate_expiry_warning, certificate_names_problem
from deploykit.fleet import Fleet
from deploykit.inventory import load_inventory
from deploykit.paths import HostPaths
from deploykit.schema import dkim_entry, tenant_dkim
from lab.config import GATEWAYS
from roles import base, blacklist, clamav, firewall, rspamd

INVENTORY = Path(os.environ.get("SMG_INVENTORY", "inventories/lab.py"))
IS_LAB = INVENTORY.name == "lab.py"
KIT = Path(__file__).resolve().parents[2]


def _host_names() -> list[str]:
    if IS_LAB:
        return [h.name for h in GATEWAYS]  # known before the lab is up
    return [g.name for g in load_inventory(INVENTORY, check_keys=False)]


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest) -> Fleet:
    if IS_LAB:
        request.getfixturevalue("lab_state")  # skips (or fails in CI) when the lab is down
    return load_inventory(KIT / INVENTORY if not INVENTORY.is_absolute() else INVENTORY)


@pytest.fixture(scope="module")
def connect(request: pytest.FixtureRequest) -> Callable[[str], Any]:
    if IS_LAB:
        return request.getfixturevalue("lab_host")
    ssh_config = os.environ.get("SMG_SSH_CONFIG")
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            data = load_inventory(INVENTORY, check_keys=False).get(name).connection
            target = data.get("ssh_hostname", name)
            user = data.get("ssh_user", "root")
            spec = f"paramiko://{user}@{target}?timeout=10"
            if ssh_config:
                spec += f"&ssh_config={ssh_config}"
            cache[name] = testinfra.get_host(spec, sudo=user != "root")
        return cache[name]

    return get


@pytest.fixture(params=_host_names())
def gw(request: pytest.FixtureRequest, fleet: Fleet, connect: Callable[[str], Any]) -> Any:
    """(testinfra host, the inventory's Gateway) for each gateway in turn."""
    return connect(request.param), fleet.get(request.param)


# --- packages and services ------------------------------------------------------------------


def test_packages_of_the_role_are_installed(gw: Any) -> None:
    host, gateway = gw
    wanted = base.PACKAGES + firewall.PACKAGES
    if gateway.role == "good":
        wanted += clamav.PACKAGES + rspamd.PACKAGES
    missing = [name for name in wanted if not host.package(name).is_installed]
    assert missing == []
    if gateway.role == "bad":  # the bad gateway scans nothing: no scanners to keep alive
        assert not host.package("rspamd").is_installed
        assert not host.package("clamav-daemon").is_installed


def test_services_are_running_and_enabled(gw: Any) -> None:
    host, gateway = gw
    units = ["smg.service", "nftables.service"]
    if gateway.role == "good":
        units += ["clamav-daemon.service", "rspamd.service"]
    for unit in units:
        service = host.service(unit)
        assert service.is_enabled, unit
        assert service.is_running or unit == "nftables.service", unit  # nftables: oneshot
    assert host.run("systemctl is-active nftables.service").stdout.strip() == "active"


def test_relay_runs_as_smg_in_its_sandbox(gw: Any) -> None:
    host, _ = gw
    shown = host.check_output(
        "systemctl show smg.service -p User -p NoNewPrivileges -p ProtectSystem -p PrivateTmp "
        "-p ProtectHome -p ReadWritePaths -p CapabilityBoundingSet -p AmbientCapabilities "
        "-p ExecReload -p MainPID"
    )
    props = dict(line.split("=", 1) for line in shown.splitlines())
    assert props["User"] == "smg"
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["PrivateTmp"] == "yes"
    assert props["ProtectHome"] == "yes"
    assert props["ReadWritePaths"] == HostPaths.SPOOL
    assert props["CapabilityBoundingSet"] == "cap_net_bind_service"
    assert props["AmbientCapabilities"] == "cap_net_bind_service"
    assert "kill -HUP" in props["ExecReload"] or "-HUP" in props["ExecReload"]
    owner = host.check_output(f"ps -o user= -p {props['MainPID']}")
    assert owner == "smg"


# The unit's exposure by systemd's own measure (issue 12): at most this.
MAX_EXPOSURE = 2.0


def test_relay_unit_exposure_is_at_most_two(gw: Any) -> None:
    host, _ = gw
    report = host.check_output("systemd-analyze security smg.service --no-pager")
    found = re.search(r"Overall exposure level for smg\.service: ([0-9.]+)", report)
    assert found, report[-500:]
    assert float(found.group(1)) <= MAX_EXPOSURE, report


def test_blacklist_timer_runs_daily_at_five_on_the_monitor_host(gw: Any) -> None:
    host, gateway = gw
    timer = host.service(blacklist.TIMER)
    if not gateway.runs_blacklist_monitor:
        assert not host.file(f"{blacklist.UNIT_DIR}/{blacklist.TIMER}").exists
        return
    assert timer.is_enabled
    assert timer.is_running
    shown = host.check_output(
        f"systemctl show {blacklist.TIMER} -p NextElapseUSecRealtime -p TimersCalendar"
    )
    assert "OnCalendar=*-*-* 05:00:00 Europe/Berlin" in shown
    next_run = re.search(r"NextElapseUSecRealtime=(.*)", shown)
    assert next_run and re.search(r" 05:00:00 CES?T$", next_run.group(1)), shown


# --- sockets --------------------------------------------------------------------------------


def listeners(host: Any) -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket."""
    found = []
    for line in host.check_output("ss -Hltnp").splitlines():
        fields = line.split()
        local, process = fields[3], fields[-1] if "users:" in fields[-1] else ""
        address, port = local.rsplit(":", 1)
        name = re.search(r'users:\(\("([^"]+)"', process)
        found.append((address.strip("[]"), int(port), name.group(1) if name else ""))
    return found


def test_smtp_on_the_listen_address_and_everything_else_on_loopback(gw: Any) -> None:
    """The listen address: the private one behind NAT, else the public one."""
    host, gateway = gw
    sockets = listeners(host)
    assert (gateway.listen_address, 25, "smg") in sockets
    # With a monitoring host (docs/monitoring.md) the relay's metrics and node exporter are on
    # the listen address (the firewall lets only the monitoring host in), and the monitoring
    # host serves Prometheus and Alertmanager there too.
    port, monitor = gateway["relay_metrics_port"], gateway["monitoring_host"]
    metrics_on = gateway.listen_address if monitor else "127.0.0.1"
    assert (metrics_on, port, "smg") in sockets
    ports = (
        {25}
        | ({port, 9100} if monitor else set())
        | ({9090, 9093} if monitor == gateway.name else set())
    )
    outside = [
        s for s in sockets if not s[0].startswith("127.") and s[0] != "::1" and s[2] != "sshd"
    ]
    assert sorted((a, p) for a, p, _ in outside) == sorted(
        (gateway.listen_address, p) for p in ports
    )
    if gateway.role == "good":
        rspamd_sockets = {(a, p) for a, p, name in sockets if name == "rspamd"}
        assert rspamd_sockets == {("127.0.0.1", 11333), ("127.0.0.1", 11334)}
        assert host.socket(f"unix://{HostPaths.CLAMD_SOCKET}").is_listening
        assert not [s for s in sockets if s[2] == "clamd"]  # clamd: no TCP at all


# --- files, owners, modes -------------------------------------------------------------------


def test_relay_config_is_the_one_rendered_from_the_inventory(gw: Any, fleet: Fleet) -> None:
    host, gateway = gw
    config = host.file(HostPaths.CONFIG)
    assert (config.user, config.group, config.mode) == ("root", "smg", 0o640)
    assert config.content_string == fleet.relay_toml(gateway.name)
    assert f'role = "{gateway.role}"' in config.content_string


def test_keys_are_the_relays_alone(gw: Any) -> None:
    host, gateway = gw
    key = host.file(HostPaths.KEY)
    assert (key.user, key.group, key.mode) == ("smg", "smg", 0o600)
    spool = host.file(HostPaths.SPOOL)
    assert (spool.user, spool.mode) == ("smg", 0o750)
    dkim_dir = host.file(HostPaths.DKIM_DIR)
    if gateway.role == "bad":
        assert not dkim_dir.exists or host.check_output(f"ls -A {HostPaths.DKIM_DIR}") == ""
        return
    assert (dkim_dir.user, dkim_dir.mode) == ("smg", 0o700)
    wanted = {
        HostPaths.dkim_key(d, s) for d, s in (dkim_entry(i)[:2] for i in gateway["dkim_domains"])
    } | {HostPaths.dkim_key(d, s) for d, s, _ in tenant_dkim(gateway["tenants"])}
    present = set(host.check_output(f"find {HostPaths.DKIM_DIR} -type f").split())
    assert present == wanted
    for path in wanted:
        file = host.file(path)
        assert (file.user, file.group, file.mode) == ("smg", "smg", 0o600), path


def test_certificate_names_the_host_as_peers_reach_it_and_is_not_near_its_end(gw: Any) -> None:
    """The certificate the host really serves: the same checks as the inventory's (a bad
    gateway's carries the address good gateways verify; none ends within 21 days)."""
    host, gateway = gw
    cert = x509.load_pem_x509_certificate(host.file(HostPaths.CERT).content)
    assert certificate_names_problem(cert, HostPaths.CERT, gateway) is None
    assert certificate_expiry_warning(cert, HostPaths.CERT) is None


def test_time_zone_is_the_inventorys(gw: Any) -> None:
    host, gateway = gw
    assert host.file("/etc/localtime").linked_to == f"/usr/share/zoneinfo/{gateway['timezone']}"


# --- the firewall ---------------------------------------------------------------------------


def saddr_networks(rule: str) -> list[Any]:
    """The networks of ``ip saddr { a, b } tcp dport 25 accept`` as nft lists them (it merges
    neighbours: two /32 may come back as one /31)."""
    listed = rule.split("saddr", 1)[1].split("tcp", 1)[0].strip().strip("{}")
    return [ipaddress.ip_network(n.strip()) for n in listed.split(",")]


def test_firewall_rules_are_the_roles(gw: Any, fleet: Fleet) -> None:
    host, gateway = gw
    ruleset = host.check_output("nft list table inet smg")
    assert "policy drop;" in ruleset
    assert 'iif "lo" accept' in ruleset
    smtp_rules = [line.strip() for line in ruleset.splitlines() if "dport 25" in line]
    _, allowed = firewall.smtp_sources(fleet, gateway)
    by_family = firewall.by_family(allowed)
    assert len(smtp_rules) == len(by_family)
    for family, networks in by_family:
        rule = next(r for r in smtp_rules if r.startswith(f"{family} saddr"))
        wanted = ipaddress.collapse_addresses(ipaddress.ip_network(n) for n in networks)
        assert list(ipaddress.collapse_addresses(saddr_networks(rule))) == list(wanted), rule


def test_firewall_keeps_smtp_and_https_out_of_internal_networks(gw: Any) -> None:
    """Issue 12: the output chain drops SMTP/HTTPS to internal networks (roles/firewall.py).
    Written without a lab run at hand: checks the loaded rules loosely (nft may reorder)."""
    host, _ = gw
    ruleset = host.check_output("nft list table inet smg")
    assert "hook output" in ruleset
    drops = [line for line in ruleset.splitlines() if "daddr" in line and " drop" in line]
    assert any("10.0.0.0/8" in d and "192.168.0.0/16" in d for d in drops), ruleset
    assert any("fc00::/7" in d for d in drops), ruleset
    assert all("25" in d and "443" in d and "587" in d for d in drops), drops


@pytest.mark.skipif(not IS_LAB, reason="the lab's customer host is in the lab only")
def test_firewall_lets_the_customer_reach_good_gateways_only(
    gw: Any, lab_state: dict[str, Any]
) -> None:
    _, gateway = gw
    netns = lab_state["customer"]["netns"]
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(('{gateway.public_address}', 25), timeout=2).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "python3", "-c", probe], timeout=20, check=False
    )
    assert (done.returncode == 0) is (gateway.role == "good")


def smtp_banner(host: Any, address: str) -> str:
    """The first reply of the relay at ``address``:25, asked from ``host``.  A ``421`` (too
    many connections: another suite may be loading the lab) is asked again, 10 times at most."""
    probe = (
        f"import socket; s = socket.create_connection(({address!r}, 25), timeout=3); "
        "print(s.recv(200).decode())"
    )
    for _ in range(10):
        banner = host.check_output(f"timeout 5 python3 -c {probe!r}")
        if not banner.startswith("421 "):
            break
        time.sleep(1)
    return banner


def test_the_bad_gateway_talks_smtp_to_the_good_gateways(
    fleet: Fleet, connect: Callable[[str], Any]
) -> None:
    for bad in fleet.bad:
        for good in fleet.good:
            banner = smtp_banner(connect(good.name), bad.listen_address)  # the private net
            assert banner.startswith(f"220 {bad.fqdn}"), (good.name, banner)


def test_relay_answers_with_its_name_and_refuses_strangers(gw: Any) -> None:
    """On loopback (local submission) the relay greets; its own public address is no client
    of it, so it gets the relay-control refusal."""
    host, gateway = gw
    assert smtp_banner(host, "127.0.0.1").startswith(f"220 {gateway.fqdn}")
    assert smtp_banner(host, gateway.listen_address).startswith("554 5.7.1")


# --- the local validating resolver (issue 14: DANE) -----------------------------------------

_AD_QUERY = """
import sys, dns.flags, dns.message, dns.query
q = dns.message.make_query(sys.argv[1], sys.argv[2], want_dnssec=True)
q.flags |= dns.flags.AD
r = dns.query.udp(q, "127.0.0.1", timeout=5)
print(dns.rcode.to_text(r.rcode()), "AD" if r.flags & dns.flags.AD else "-", len(r.answer))
"""


def test_local_resolver_validates_on_loopback_only(gw: Any) -> None:
    host, gateway = gw
    if not gateway["local_resolver"]:
        pytest.skip("local_resolver is off in this inventory")
    assert host.service("unbound.service").is_enabled
    assert host.service("unbound.service").is_running
    sockets = listeners(host)
    assert ("127.0.0.1", 53, "unbound") in sockets
    assert not [s for s in sockets if s[2] == "unbound" and not s[0].startswith("127.")]
    python = f"{HostPaths.VENV}/bin/python3"

    def ask(name: str, rdtype: str) -> str:
        return host.check_output(f"{python} -c '{_AD_QUERY}' {name} {rdtype}")

    if IS_LAB:  # the lab's signed zones validate; the others are insecure, not bogus
        assert ask("partner-tls.example", "MX").startswith("NOERROR AD")
        assert ask("_25._tcp.mx.partner-tls.example", "TLSA").startswith("NOERROR AD")
        assert ask("customer-a.example", "MX").startswith("NOERROR -")


def test_tls_report_timer_on_good_gateways(gw: Any) -> None:
    host, gateway = gw
    timer = host.service("smg-tlsrpt.timer")
    if gateway.role == "good":
        assert timer.is_enabled and timer.is_running
    else:
        assert not host.file("/etc/systemd/system/smg-tlsrpt.timer").exists
