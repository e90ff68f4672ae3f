"""Private and public addresses (issue 13, point 1): behind 1:1 NAT the relay listens and binds
on the host's private address; the world (SPF, PTR, DNSBLs, far ends) sees the public one; the
fleet's peers talk over the shared private network.  Without the keys nothing changes."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from deploykit.fleet import Fleet
from gateway.config import parse_config
from roles import firewall
from tests.harness import TestCA
from tests.unit.test_inventory import Site, one

# Documentation addresses, as strings only (nothing is dialled): public 2001:db8:10::/64 from
# the Site, "private" 198.51.100.128/25 as in the lab.
PRIVATE = {
    "otc-de-mta01": "198.51.100.131",
    "otc-de-mta02": "198.51.100.132",
    "otc-de-mta03": "198.51.100.133",
}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


def nat_site(tmp_path: Path, ca: TestCA) -> Site:
    site = Site(tmp_path, ca)
    for name, private in PRIVATE.items():
        host = site.hosts[name]
        host["listen_address"] = private
        leaf = ca.valid(host["fqdn"], host["public_address"], private)
        host["tls_cert_file"], host["tls_key_file"] = str(leaf.cert_path), str(leaf.key_path)
    return site


def config(fleet: Fleet, name: str):
    return parse_config(tomllib.loads(fleet.relay_toml(name)))


def test_without_the_keys_everything_is_the_public_address(tmp_path: Path, ca: TestCA) -> None:
    fleet = Site(tmp_path, ca).load()
    for gateway in fleet:
        assert gateway.listen_address == gateway.source_address == gateway.public_address


def test_behind_nat_the_relay_listens_and_sends_on_the_private_address(
    tmp_path: Path, ca: TestCA
) -> None:
    fleet = nat_site(tmp_path, ca).load()
    for gateway in fleet:
        relay = config(fleet, gateway.name)
        private = PRIVATE[gateway.name]
        assert (private, 25) in relay.gateway.listen
        assert (gateway.public_address, 25) not in relay.gateway.listen
        assert relay.gateway.source_address == private  # source defaults to listen
        # The DNSBLs list the public addresses: the monitor checks those.
        assert relay.blacklist.addresses == [g.public_address for g in fleet]


def test_the_fleet_talks_over_the_private_network(tmp_path: Path, ca: TestCA) -> None:
    fleet = nat_site(tmp_path, ca).load()
    good, bad = config(fleet, "otc-de-mta01"), config(fleet, "otc-de-mta03")
    assert good.routing.bad_gateways == [(PRIVATE["otc-de-mta03"], 25)]
    nets = [str(n) for n in bad.gateway.client_networks]
    assert "198.51.100.131/32" in nets and "198.51.100.132/32" in nets
    assert "2001:db8:10::1/128" not in nets
    assert bad.routing.good_gateways == ["198.51.100.131", "198.51.100.132"]
    rules = firewall.nftables_conf(fleet, fleet.get("otc-de-mta03"))
    assert "198.51.100.131" in rules and "2001:db8:10::1 " not in rules


def test_a_separate_source_address(tmp_path: Path, ca: TestCA) -> None:
    site = nat_site(tmp_path, ca)
    site.hosts["otc-de-mta01"]["source_address"] = "198.51.100.141"
    fleet = site.load()
    assert config(fleet, "otc-de-mta01").gateway.source_address == "198.51.100.141"
    assert "198.51.100.141/32" in [
        str(n) for n in config(fleet, "otc-de-mta03").gateway.client_networks
    ]


def test_the_bad_gateways_certificate_must_carry_its_private_address(
    tmp_path: Path, ca: TestCA
) -> None:
    site = nat_site(tmp_path, ca)
    bad = site.hosts["otc-de-mta03"]
    leaf = ca.valid(bad["fqdn"], bad["public_address"])  # the public address only
    bad["tls_cert_file"], bad["tls_key_file"] = str(leaf.cert_path), str(leaf.key_path)
    assert "no IP address entry 198.51.100.133" in one(site.problems(), "otc-de-mta03")


def test_private_addresses_are_checked(tmp_path: Path, ca: TestCA) -> None:
    site = nat_site(tmp_path, ca)
    site.hosts["otc-de-mta02"]["listen_address"] = "198.51.100.131"
    site.hosts["otc-de-mta01"]["source_address"] = "not-an-address"
    problems = site.problems()
    assert "198.51.100.131 is also otc-de-mta01's listen_address" in one(problems, "is also")
    one(problems, "otc-de-mta01: source_address")


def test_the_lab_inventory_takes_the_nat_host_from_the_lab_state(
    tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lab/run/state.json names otc-de-mta04's private address: lab.py makes it the
    listen_address; the good gateways send spam to both bad gateways, mta04 privately."""
    import json

    from deploykit.inventory import load_inventory
    from tests.unit.test_inventory import KIT, fake_lab_state

    path = fake_lab_state(tmp_path, ca)
    state = json.loads(path.read_text())
    leaf = ca.valid("otc-de-mta04.lab.example", "198.51.100.13", "198.51.100.134")
    state["hosts"]["otc-de-mta04"] = {
        "address": "198.51.100.13", "private_address": "198.51.100.134",
        "fqdn": "otc-de-mta04.lab.example", "role": "bad",
        "cert": str(leaf.cert_path), "key": str(leaf.key_path),
    }  # fmt: skip
    path.write_text(json.dumps(state))
    monkeypatch.setenv("SMG_LAB_STATE", str(path))
    fleet = load_inventory(KIT / "inventories" / "lab.py", check_keys=False)
    good = config(fleet, "otc-de-mta01")
    assert good.routing.bad_gateways == [("198.51.100.12", 25), ("198.51.100.134", 25)]
    assert config(fleet, "otc-de-mta04").gateway.source_address == "198.51.100.134"
    assert "198.51.100.13" in good.blacklist.addresses
    assert "198.51.100.134" not in good.blacklist.addresses
