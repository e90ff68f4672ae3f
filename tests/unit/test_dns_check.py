"""``python -m deploykit dns-check`` and the deploy's DKIM gate against a real knotd (issue 13,
point 4): records missing are printed as zone-file lines and the exit status says so; once
those very lines are served, everything is ok; a key whose record is missing or different is
held back from the relay config unless the inventory says ``dkim_unpublished_ok``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from deploykit import dnscheck
from deploykit.fleet import Fleet
from gateway.dkim import dns_record_value, load_private_key, zone_line
from tests.harness import KnotDNS, TestCA
from tests.unit.test_inventory import KIT, Site

pytestmark = pytest.mark.integration

ZONE = "dnschk.test"
CUSTOMER = f"cust.{ZONE}"
REVERSE = "100.51.198.in-addr.arpa"
ADDRESSES = {"otc-de-mta01": "198.51.100.21", "otc-de-mta02": "198.51.100.22",
             "otc-de-mta03": "198.51.100.23"}  # fmt: skip


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def site(tmp_path: Path, ca: TestCA, knot_dns: KnotDNS) -> Site:
    site = Site(tmp_path, ca)
    for name, address in ADDRESSES.items():
        host = site.hosts[name]
        host["fqdn"], host["public_address"] = f"{name}.gw.{ZONE}", address
        leaf = ca.valid(host["fqdn"], address)
        host["tls_cert_file"], host["tls_key_file"] = str(leaf.cert_path), str(leaf.key_path)
    site.good["dkim_domains"] = [{"domain": CUSTOMER, "selector": "s1", "algorithm": "ed25519"}]
    site.add_key(CUSTOMER, "s1", "ed25519")
    site.all["spf_domain"] = f"spf.{ZONE}"
    site.all["resolvers"] = []
    for zone in (ZONE, CUSTOMER, REVERSE):
        knot_dns.set_zone(zone, "")
    return site


def run_check(site: Site, knot: KnotDNS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploykit", "dns-check", str(site.write()),
         "--nameserver", knot.nameserver],
        capture_output=True, text=True, timeout=120, cwd=KIT, check=False,
    )  # fmt: skip


def publish(knot: KnotDNS, lines: list[str]) -> None:
    """Zone-file lines as dns-check printed them, into the zone each belongs to."""
    by_zone: dict[str, list[str]] = {}
    for line in lines:
        owner = line.split()[0].rstrip(".")
        zone = max((z for z in (ZONE, CUSTOMER, REVERSE) if owner.endswith(z)), key=len)
        by_zone.setdefault(zone, []).append(line)
    for zone, records in by_zone.items():
        knot.set_zone(zone, "\n".join(records) + "\n")


def test_missing_records_are_printed_as_zone_lines_then_found(site: Site, knot_dns) -> None:
    done = run_check(site, knot_dns)
    assert done.returncode == 3, done.stdout + done.stderr
    out = done.stdout
    assert f"MISSING DKIM s1._domainkey.{CUSTOMER}: no DKIM TXT record" in out
    assert f"MISSING SPF spf.{ZONE}: no SPF record" in out
    assert "MISSING PTR otc-de-mta03 198.51.100.23" in out
    zone_lines = out.split("; to publish (zone-file lines):\n")[1].splitlines()
    assert f"23.100.51.198.in-addr.arpa. 3600 IN PTR otc-de-mta03.gw.{ZONE}." in zone_lines
    assert f"otc-de-mta03.gw.{ZONE}. 3600 IN A 198.51.100.23" in zone_lines
    spf = next(line for line in zone_lines if line.startswith(f"spf.{ZONE}."))
    assert "ip4:198.51.100.21 ip4:198.51.100.22 ip4:198.51.100.23 -all" in spf
    assert len(zone_lines) == 1 + 1 + 2 * 3  # DKIM, SPF, PTR and A for each gateway
    publish(knot_dns, zone_lines)
    again = run_check(site, knot_dns)
    assert again.returncode == 0, again.stdout
    assert "MISSING" not in again.stdout and "to publish" not in again.stdout


def test_wrong_key_and_incomplete_spf_are_found(site: Site, knot_dns) -> None:
    other = site.add_key(f"other.{ZONE}", "s1", "ed25519")
    wrong = zone_line(f"s1._domainkey.{CUSTOMER}", dns_record_value(load_private_key(other)))
    knot_dns.set_zone(CUSTOMER, wrong + "\n")
    knot_dns.set_zone(ZONE, 'spf TXT "v=spf1 ip4:198.51.100.21 ip4:198.51.100.22 ~all"\n')
    out = run_check(site, knot_dns).stdout
    assert f"MISSING DKIM s1._domainkey.{CUSTOMER}: published with another public key" in out
    assert f"MISSING SPF spf.{ZONE}: does not list 198.51.100.23" in out


def held(fleet: Fleet, knot: KnotDNS) -> dict[tuple[str, str], str]:
    return dnscheck.unpublished_dkim_keys(fleet, dnscheck.Lookup([knot.nameserver]))


def test_the_deploy_signs_only_with_published_keys(site: Site, knot_dns) -> None:
    fleet = site.load()
    assert held(fleet, knot_dns) == {(CUSTOMER, "s1"): "no DKIM TXT record"}
    gated = dataclasses.replace(fleet, held_dkim=frozenset(held(fleet, knot_dns)))
    assert tomllib.loads(gated.relay_toml("otc-de-mta01"))["dkim"]["keys"] == []
    assert tomllib.loads(fleet.relay_toml("otc-de-mta01"))["dkim"]["keys"]  # ungated: signs
    key = load_private_key(site.keys / CUSTOMER / "s1.key")
    knot_dns.set_zone(CUSTOMER, zone_line(f"s1._domainkey.{CUSTOMER}", dns_record_value(key)))
    assert held(fleet, knot_dns) == {}
    site.all["dkim_unpublished_ok"] = True
    knot_dns.set_zone(CUSTOMER, "")
    assert held(site.load(), knot_dns) == {}  # the override: signs anyway


TLSA = "3 1 1 " + "ab" * 32


def test_a_dane_rule_needs_tlsa_records_at_every_mx(site: Site, knot_dns) -> None:
    site.good["tls_rules"] = [
        {"sender": CUSTOMER, "recipient": f"dane.{ZONE}", "level": "dane", "on_failure": "hold"},
        {"sender": CUSTOMER, "recipient": f".any.{ZONE}", "level": "dane", "on_failure": "hold"},
        {"sender": CUSTOMER, "recipient": f"pkix.{ZONE}", "level": "verify"},
    ]
    knot_dns.set_zone(ZONE, f"dane MX 10 mx1.dane\ndane MX 20 mx2.dane\n"
                            f"_25._tcp.mx1.dane TLSA {TLSA}\n")  # fmt: skip
    fleet = site.load()
    assert dnscheck.dane_domains(fleet) == [f"dane.{ZONE}"]  # no pattern, no verify rule
    (finding,) = dnscheck.tlsa_findings(fleet, dnscheck.Lookup([knot_dns.nameserver]))
    assert not finding.ok and f"no TLSA record for mx2.dane.{ZONE}" in finding.detail
    assert finding.fix == (
        f"; dane.{ZONE}'s DNS team: _25._tcp.mx2.dane.{ZONE}. IN TLSA 3 1 1 "
        f"<SHA-256 of mx2.dane.{ZONE}'s key>",
    )
    both = f"_25._tcp.mx1.dane TLSA {TLSA}\n_25._tcp.mx2.dane TLSA {TLSA}\n"
    knot_dns.set_zone(ZONE, f"dane MX 10 mx1.dane\ndane MX 20 mx2.dane\n{both}")
    (finding,) = dnscheck.tlsa_findings(fleet, dnscheck.Lookup([knot_dns.nameserver]))
    assert finding.ok, finding
