"""What the roles render from a validated inventory, checked without any host: the firewall
rules (by nft itself), the relay's hardened unit, rspamd and clamd on loopback, the blacklist
timer at 05:00, the wheelhouse digest."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deploykit.fleet import Fleet
from roles import blacklist, clamav, firewall, relay, rspamd
from tests.harness import TestCA
from tests.unit.test_inventory import Site


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("site")
    return Site(root, TestCA(root / "ca")).load()


def nft_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``nft --check`` parses and validates the ruleset without loading it."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("nft --check needs root and nftables")
    path = tmp_path / "nftables.conf"
    path.write_text(text)
    return subprocess.run(
        ["nft", "--check", "-f", str(path)], capture_output=True, text=True, timeout=30
    )


def test_good_gateway_firewall_takes_smtp_only_from_customers(fleet: Fleet, tmp_path: Path) -> None:
    text = firewall.nftables_conf(fleet, fleet.get("otc-de-mta01"))
    assert "policy drop;" in text
    assert 'iif "lo" accept' in text
    assert "ip saddr { 10.20.0.0/16 } tcp dport 25 accept" in text
    assert "ip6 saddr { 2001:db8:99::/48 } tcp dport 25 accept" in text
    # SSH only from the inventory's ssh_networks (no 0.0.0.0/0 default any more, issue 12)
    assert "ip6 saddr { 2001:db8:ff::/64 } tcp dport 22 accept" in text
    assert "0.0.0.0/0" not in text
    assert text.count("dport 25") == 2
    checked = nft_check(text, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_bad_gateway_firewall_takes_smtp_only_from_the_good_gateways(
    fleet: Fleet, tmp_path: Path
) -> None:
    text = firewall.nftables_conf(fleet, fleet.get("otc-de-mta03"))
    assert "ip6 saddr { 2001:db8:10::1/128, 2001:db8:10::2/128 } tcp dport 25 accept" in text
    assert "10.20.0.0/16" not in text
    assert text.count("dport 25") == 1
    checked = nft_check(text, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_firewall_replaces_only_its_own_table(fleet: Fleet) -> None:
    text = firewall.nftables_conf(fleet, fleet.get("otc-de-mta01"))
    assert "flush ruleset" not in text
    assert "table inet smg\ndelete table inet smg\n" in text


def test_firewall_drops_smtp_and_https_to_internal_networks_but_the_fleet(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Issue 12: the egress rule behind the relay's own refusal of internal targets."""
    for name in ("otc-de-mta01", "otc-de-mta03"):
        text = firewall.nftables_conf(fleet, fleet.get(name))
        ports = "tcp dport { 25, 465, 587, 443 }"
        internal_v4 = "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16, 100.64.0.0/10"
        assert f"ip daddr {{ {internal_v4} }} {ports} counter drop" in text
        assert f"ip6 daddr {{ fc00::/7, fe80::/10 }} {ports} counter drop" in text
        fleet_v6 = "2001:db8:10::1/128, 2001:db8:10::2/128, 2001:db8:10::3/128"
        allowed = text.index(f"ip6 daddr {{ {fleet_v6} }} {ports} accept")
        assert allowed < text.index('counter drop comment "no smtp')  # accepted first
        assert "type filter hook output priority filter; policy accept;" in text
        checked = nft_check(text, tmp_path)
        assert checked.returncode == 0, checked.stderr


def test_firewall_egress_lets_a_private_lab_network_and_own_endpoints_through(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path, TestCA(tmp_path / "ca"))
    site.all["extra_public_networks"] = ["192.168.56.0/24", "198.51.100.0/24"]
    site.all["clamav_mirror"] = "https://10.1.2.3/clamav"  # an internal mirror, by address
    site.all["ticket_url"] = "https://tickets.example.net/new"  # a name: not known here
    fleet = site.load()
    allowed = firewall.egress_allowed(fleet, fleet.get("otc-de-mta01"))
    assert "192.168.56.0/24" in allowed and "10.1.2.3/32" in allowed
    assert "198.51.100.0/24" not in allowed  # the lab's public range needs no exception
    assert "127.0.0.1/32" not in allowed  # notify_via on loopback: no rule touches loopback
    text = firewall.nftables_conf(fleet, fleet.get("otc-de-mta01"))
    assert "ip daddr { 192.168.56.0/24, 10.1.2.3/32 } tcp dport" in text
    checked = nft_check(text, tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_relay_unit_is_hardened(fleet: Fleet) -> None:
    unit = relay.unit_file(fleet.get("otc-de-mta01"))
    for line in (
        "User=smg",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/spool/smg",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/opt/smg/venv/bin/smg serve --config /etc/smg/smg.toml",
    ):
        assert line in unit.splitlines(), line
    assert [x for x in unit.splitlines() if x.startswith("ReadWritePaths")] == [
        "ReadWritePaths=/var/spool/smg"
    ]
    assert "rspamd.service" not in relay.unit_file(fleet.get("otc-de-mta03"))


def test_relay_unit_memory_follows_the_budget_and_workers(fleet: Fleet) -> None:
    unit = relay.unit_file(fleet.get("otc-de-mta01"))
    assert "MemoryMax=1152M" in unit.splitlines()  # 128 MiB + 4 x 256 MiB (the default)
    assert "TasksMax=48" in unit.splitlines()
    limits = relay.unit_limits({"data_memory": "64MiB", "workers": 2})
    assert limits["memory_max"] == "768M"  # 2 x (128 MiB + 4 x 64 MiB)
    assert limits["tasks_max"] == 80


def test_rspamd_listens_on_loopback_only_without_fuzzy(fleet: Fleet) -> None:
    files = rspamd.config_files(fleet.get("otc-de-mta01"))
    assert 'bind_socket = "127.0.0.1:11333";' in files["override.d/worker-normal.inc"]
    assert 'bind_socket = "127.0.0.1:11334";' in files["override.d/worker-controller.inc"]
    assert "count = -1;" in files["override.d/worker-fuzzy.inc"]
    assert "count = -1;" in files["override.d/worker-proxy.inc"]
    assert "enabled = false;" in files["local.d/fuzzy_check.conf"]


def test_clamd_has_no_tcp_socket_and_takes_the_largest_message(fleet: Fleet) -> None:
    text = clamav.clamd_conf(fleet.get("otc-de-mta01"))
    assert "TCPSocket" not in text
    assert "LocalSocket /run/clamav/clamd.ctl" in text
    assert "StreamMaxLength 30M" in text  # 25 MiB messages plus headroom


def test_freshclam_uses_the_inventory_mirror() -> None:
    assert "DatabaseMirror database.clamav.net" in clamav.freshclam_conf(
        "https://database.clamav.net"
    )
    assert "PrivateMirror http://mirror.example.net/clamav" in clamav.freshclam_conf(
        "http://mirror.example.net/clamav"
    )


def test_the_kit_ships_a_signature_set(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    names = [p.name for p in clamav.shipped_signatures(fleet.get("otc-de-mta01"))]
    assert names and all(n.endswith((".hdb", ".ndb", ".ldb", ".hsb")) for n in names)


def test_blacklist_timer_runs_daily_at_five_in_berlin(fleet: Fleet) -> None:
    units = blacklist.units(fleet.get("otc-de-mta01"))
    timer = units[blacklist.TIMER]
    assert "OnCalendar=*-*-* 05:00:00 Europe/Berlin" in timer
    assert "Persistent=true" in timer
    assert (
        "/opt/smg/venv/bin/smg blacklist check --config /etc/smg/smg.toml"
        in units[blacklist.SERVICE]
    )
    if shutil.which("systemd-analyze"):
        shown = subprocess.run(
            ["systemd-analyze", "calendar", "*-*-* 05:00:00 Europe/Berlin"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        assert "05:00:00" in shown.stdout


def test_wheelhouse_digest_follows_the_sources(tmp_path: Path) -> None:
    (tmp_path / "gateway").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "gateway" / "a.py").write_text("A = 1\n")
    (tmp_path / "gateway" / "__pycache__").mkdir()
    (tmp_path / "gateway" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    first = relay.source_digest(tmp_path)
    (tmp_path / "gateway" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"other junk")
    assert relay.source_digest(tmp_path) == first  # byte code does not count
    (tmp_path / "gateway" / "a.py").write_text("A = 2\n")
    assert relay.source_digest(tmp_path) != first


def test_install_reinstalls_our_wheel_and_records_what_it_installed() -> None:
    commands = relay.install_commands()
    assert "--no-index" in commands[0] and "--find-links /opt/smg/wheelhouse" in commands[0]
    assert "--force-reinstall" in commands[1] and "--no-deps" in commands[1]
    assert commands[2].endswith(relay.INSTALLED_SUMS)


def test_a_config_change_is_a_reload_unless_the_relay_reads_the_key_only_at_start(
    fleet: Fleet,
) -> None:
    current = fleet.relay_toml("otc-de-mta01")
    more_rules = current.replace('sender = "customer.example"', 'sender = "other.example"')
    assert more_rules != current
    assert not relay.restart_needed(current, more_rules)  # forced-TLS table: SIGHUP
    other_port = current.replace("127.0.0.1:9525", "127.0.0.1:9526")
    assert relay.restart_needed(current, other_port)  # metrics_listen: only at start
    assert not relay.restart_needed(None, current)  # first install: the start reads it
    assert relay.restart_needed("not toml [", current)


# --- resolver (issue 14: DANE needs a validating resolver of the host's own) -----------------


def test_resolver_config_lab_and_production(tmp_path) -> None:
    from roles import resolver

    base = {"resolvers": ["198.51.100.1"], "local_resolver": True, "extra_public_networks": []}
    lab = {**base, "resolver_stub": True,
           "dnssec_trust_anchors": ["partner-tls.example. DNSKEY 257 3 13 AbC="]}  # fmt: skip
    text = resolver.config_text(lab)  # type: ignore[arg-type]
    assert 'trust-anchor: "partner-tls.example. DNSKEY 257 3 13 AbC="' in text
    assert "auto-trust-anchor-file" not in text  # the lab's root is not signed
    assert "stub-zone:" in text and "stub-addr: 198.51.100.1" in text
    assert "interface: 127.0.0.1" in text and "0.0.0.0" not in text
    production = resolver.config_text({**base, "resolver_stub": False,  # type: ignore[arg-type]
                                       "dnssec_trust_anchors": []})  # fmt: skip
    assert 'auto-trust-anchor-file: "/var/lib/unbound/root.key"' in production
    assert "forward-zone:" in production and "forward-addr: 198.51.100.1" in production
    assert resolver.packages({"local_resolver": False}) == []  # type: ignore[arg-type]


def test_tlsrpt_timer_on_good_gateways_only() -> None:
    from types import SimpleNamespace

    from roles import tlsrpt

    units = tlsrpt.units()
    assert "tls report --send --config /etc/smg/smg.toml" in units["smg-tlsrpt.service"]
    assert "OnCalendar=*-*-* 00:30:00 UTC" in units["smg-tlsrpt.timer"]
    good = tlsrpt.unit_files(SimpleNamespace(role="good"))  # type: ignore[arg-type]
    bad = tlsrpt.unit_files(SimpleNamespace(role="bad"))  # type: ignore[arg-type]
    assert all(type(f).__name__ == "File" for f in good)
    assert all(type(f).__name__ == "Absent" for f in bad)
