"""The inventory's validation (deploykit/): each class of mistake is refused with a
message naming the file and the entry, and a valid inventory renders relay configs the relay
accepts.  Inventories are written to a temp dir the way an SRE writes them."""

from __future__ import annotations

import datetime
import json
import pprint
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from deploykit.fleet import Fleet
from deploykit.inventory import load_inventory, print_warnings
from deploykit.loader import display_path
from deploykit.problems import InventoryError
from deploykit.render import to_toml
from gateway.config import parse_config
from gateway.dkim import write_new_key
from tests.harness import TestCA

KIT = Path(__file__).resolve().parents[2]
HOSTS = {
    "otc-de-mta01": ("good", "2001:db8:10::1"),
    "otc-de-mta02": ("good", "2001:db8:10::2"),
    "otc-de-mta03": ("bad", "2001:db8:10::3"),
}


class Site:
    """A complete, valid inventory in a temp dir: ``site.py`` + ``group_data/``, certificates
    from a test CA, DKIM keys.  Tests change one thing and look at the error."""

    def __init__(self, root: Path, ca: TestCA) -> None:
        self.root = root
        self.dir = root / "inventories"
        (self.dir / "group_data").mkdir(parents=True)
        self.keys = root / "keys"
        self.ca = ca
        self.hosts: dict[str, dict[str, Any]] = {}
        for name, (_, address) in HOSTS.items():
            fqdn = f"{name}.mms.example.net"
            leaf = ca.valid(fqdn, address)
            self.hosts[name] = {
                "fqdn": fqdn,
                "public_address": address,
                "tls_cert_file": str(leaf.cert_path),
                "tls_key_file": str(leaf.key_path),
                "ssh_hostname": address,
            }
        self.groups = {
            "good": [n for n, (r, _) in HOSTS.items() if r == "good"],
            "bad": ["otc-de-mta03"],
        }
        self.all: dict[str, Any] = {
            "internal_ca_file": str(ca.ca_bundle),
            "operations_mailbox": "DD-OTC-SDM@telekom.de",
            "dkim_keys_dir": str(self.keys),
            "dnsbl_zones": [{"zone": "zen.spamhaus.org"}, {"zone": "bl.spamcop.net"}],
            "tls_rules": [
                {"sender": "customer.example", "recipient": "partner.example", "level": "verify"},
                {"sender": ".customer.example", "recipient": "*", "on_failure": "reject"},
            ],
            "blacklist_monitor_hosts": ["otc-de-mta01"],
            "ssh_networks": ["2001:db8:ff::/64"],
        }
        self.good: dict[str, Any] = {
            "customer_networks": ["10.20.0.0/16", "2001:db8:99::/48"],
            "dkim_domains": [
                {"domain": "customer.example", "selector": "s1", "algorithm": "ed25519"},
            ],
        }
        self.bad: dict[str, Any] = {}
        self.site: dict[str, Any] | None = None
        self.add_key("customer.example", "s1", "ed25519")

    def add_key(self, domain: str, selector: str, algorithm: str) -> Path:
        path, _ = write_new_key(self.keys, domain, selector, algorithm)
        return path

    @property
    def inventory(self) -> Path:
        return self.dir / "site.py"

    def write(self) -> Path:
        lines = ["from deploykit.inventory import validate_inventory", ""]
        written: set[str] = set()
        for group, names in self.groups.items():
            entries = [(n, self.hosts[n]) if n not in written else n for n in names]
            written.update(names)
            lines.append(f"{group} = {pprint.pformat(entries)}")
        if self.site is not None:
            lines.append(f"site = ({list(self.hosts)!r}, {pprint.pformat(self.site)})")
        lines += ["", "validate_inventory(__file__, globals())", ""]
        self.inventory.write_text("\n".join(lines))
        for name, data in (("all", self.all), ("good", self.good), ("bad", self.bad)):
            text = "".join(f"{key} = {value!r}\n" for key, value in data.items())
            (self.dir / "group_data" / f"{name}.py").write_text(text)
        return self.inventory

    def load(self) -> Fleet:
        return load_inventory(self.write())

    def problems(self) -> list[str]:
        with pytest.raises(InventoryError) as caught:
            self.load()
        return [p.render() for p in caught.value.problems]

    def file(self, name: str) -> str:
        """How errors name a file of this site (relative to the working directory if inside)."""
        path = self.inventory if name == "site.py" else self.dir / "group_data" / name
        return display_path(path)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def site(tmp_path: Path, ca: TestCA) -> Site:
    return Site(tmp_path, ca)


def one(problems: list[str], pattern: str) -> str:
    found = [p for p in problems if re.search(pattern, p)]
    assert len(found) == 1, f"{pattern!r} in {problems}"
    return found[0]


# --- a valid inventory ----------------------------------------------------------------------


def test_a_valid_inventory_gives_each_host_its_role_and_data(site: Site) -> None:
    fleet = site.load()
    assert [(g.name, g.role) for g in fleet] == [(n, r) for n, (r, _) in HOSTS.items()]
    mta01 = fleet.get("otc-de-mta01")
    assert mta01.public_address == "2001:db8:10::1"
    assert mta01["customer_networks"] == ["10.20.0.0/16", "2001:db8:99::/48"]
    assert mta01["timezone"] == "Europe/Berlin"  # a default
    assert mta01.runs_blacklist_monitor
    assert not fleet.get("otc-de-mta02").runs_blacklist_monitor
    # deploy.py reads the same values from pyinfra's host.data.
    seen = host_data_gateways(site.inventory)
    assert seen == {g.name: [g.role, json.loads(json.dumps(g.settings))] for g in fleet}


# pyinfra's CLI loads the inventory (the file validates itself as it runs) and deploy.py's view
# of each host is printed.  In a subprocess: importing pyinfra_cli monkey-patches the process
# with gevent, which would break the asyncio tests that run after this one.
_HOST_DATA_GATEWAYS = """
import json, sys
from pyinfra.api import State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory
from deploykit.host import gateway_from_host_data
with ctx_state.use(State()):
    inventory = make_inventory(sys.argv[1], cwd=".")
out = {}
for target in inventory:
    gateway = gateway_from_host_data(target.name, target.groups, target.data.dict())
    out[gateway.name] = [gateway.role, gateway.settings]
print(json.dumps(out))
"""


def host_data_gateways(inventory: Path) -> dict[str, list[Any]]:
    done = subprocess.run(
        [sys.executable, "-c", _HOST_DATA_GATEWAYS, str(inventory)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=KIT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_each_relay_config_is_what_the_relay_accepts(site: Site) -> None:
    fleet = site.load()
    for gateway in fleet:
        text = fleet.relay_toml(gateway.name)
        config = parse_config(tomllib.loads(text), source=gateway.name)
        assert config.gateway.role == gateway.role
        assert config.gateway.hostname == gateway.fqdn
        assert config.gateway.source_address == gateway.public_address
        assert (gateway.public_address, 25) in config.gateway.listen
    good = parse_config(tomllib.loads(fleet.relay_toml("otc-de-mta01")))
    bad = parse_config(tomllib.loads(fleet.relay_toml("otc-de-mta03")))
    assert good.routing.bad_gateways == [("2001:db8:10::3", 25)]
    assert [k.domain for k in good.dkim.keys] == ["customer.example"]
    assert good.dkim.keys[0].key == Path("/etc/smg/dkim/customer.example.s1.key")
    assert [str(n) for n in good.gateway.client_networks][:2] == [
        "10.20.0.0/16",
        "2001:db8:99::/48",
    ]
    assert [r.sender for r in good.tls_policy.rules] == ["customer.example", ".customer.example"]
    assert good.blacklist.operations_mailbox == "DD-OTC-SDM@telekom.de"
    assert sorted(good.blacklist.addresses) == sorted(a for _, a in HOSTS.values())
    # The bad gateway takes mail only from the good gateways, over TLS, and scans nothing.
    assert [str(n) for n in bad.gateway.client_networks] == [
        "2001:db8:10::1/128",
        "2001:db8:10::2/128",
        "127.0.0.0/8",
    ]
    assert bad.gateway.require_tls_from_clients
    assert not bad.virus.enabled and not bad.spam.enabled
    assert bad.dkim.keys == []


def test_site_group_overrides_role_groups_like_pyinfra(site: Site) -> None:
    site.site = {"customer_networks": ["10.99.0.0/16"], "timezone": "UTC"}
    fleet = site.load()
    assert fleet.get("otc-de-mta01")["customer_networks"] == ["10.99.0.0/16"]
    assert fleet.get("otc-de-mta03")["timezone"] == "UTC"
    source = fleet.get("otc-de-mta01").sources["customer_networks"]
    assert source.file == site.file("site.py")


def test_relay_settings_reach_the_relay_config(site: Site) -> None:
    site.bad = {"relay_settings": {"delivery": {"concurrency": 16}}}
    fleet = site.load()
    assert "concurrency = 16" in fleet.relay_toml("otc-de-mta03")
    assert "concurrency" not in fleet.relay_toml("otc-de-mta01")


def test_destination_limits_reach_the_relay_config(site: Site) -> None:
    site.bad = {"relay_destinations": [{"domains": ["big.example"], "concurrency": 50}]}
    fleet = site.load()
    toml = fleet.relay_toml("otc-de-mta03")
    assert "[[delivery.destinations]]" in toml and "concurrency = 50" in toml
    site.bad = {"relay_destinations": [{"domains": ["big.example"], "rate": "fast"}]}
    problem = one(site.problems(), "relay_destinations")
    assert "delivery.destinations[0].rate" in problem and "100/s" in problem


# --- each class of mistake names the file and the entry -------------------------------------


def test_unknown_keys_name_the_file_and_suggest_the_key(site: Site) -> None:
    site.all["operation_mailbox"] = "x@example.net"
    site.hosts["otc-de-mta02"]["pubic_address"] = "2001:db8::9"
    problems = site.problems()
    assert one(problems, "operation_mailbox") == (
        f"{site.file('all.py')}: group all: operation_mailbox: unknown key "
        "(did you mean operations_mailbox?)"
    )
    assert one(problems, "pubic_address").startswith(
        f"{site.file('site.py')}: good[1] otc-de-mta02: pubic_address: unknown key"
    )


def test_bad_domain_names_are_refused_where_they_are_written(site: Site) -> None:
    site.hosts["otc-de-mta01"]["fqdn"] = "mta01..example.net"
    site.good["dkim_domains"] = [{"domain": "bad_domain.example", "selector": "s1"}]
    site.all["tls_rules"] = [{"sender": "-x.example", "recipient": "partner.example"}]
    site.all["dnsbl_zones"] = [{"zone": "zen spamhaus org"}]
    problems = site.problems()
    assert one(problems, r"fqdn").startswith(f"{site.file('site.py')}: good[0] otc-de-mta01: fqdn:")
    assert one(problems, r"dkim_domains\[0\]").startswith(
        f"{site.file('good.py')}: group good: dkim_domains[0] (bad_domain.example): domain:"
    )
    assert one(problems, r"tls_rules\[0\]\.sender").startswith(
        f"{site.file('all.py')}: group all: tls_rules[0].sender: not a valid domain name"
    )
    assert one(problems, r"dnsbl_zones\[0\]\.zone").startswith(
        f"{site.file('all.py')}: group all: dnsbl_zones[0].zone: not a valid domain name"
    )


def test_a_dkim_domain_without_a_key_is_refused_with_the_fix(site: Site) -> None:
    site.good["dkim_domains"].append({"domain": "new.example", "selector": "s2025"})
    problem = one(site.problems(), "new.example")
    assert problem.startswith(f"{site.file('good.py')}: group good: dkim_domains[1] (new.example):")
    assert f"{site.keys}/new.example/s2025.key does not exist" in problem
    assert "python -m deploykit dkim-keys" in problem


def test_dkim_keys_command_makes_missing_keys_and_the_dns_records(site: Site) -> None:
    site.good["dkim_domains"].append(
        {"domain": "new.example", "selector": "s2025", "algorithm": "ed25519"}
    )
    site.write()
    done = subprocess.run(
        [sys.executable, "-m", "deploykit", "dkim-keys", str(site.inventory)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=KIT,
    )
    assert done.returncode == 0, done.stderr
    key = site.keys / "new.example" / "s2025.key"
    assert key.stat().st_mode & 0o777 == 0o600
    records = (site.keys / "dns-records.txt").read_text()
    assert 's2025._domainkey.new.example. 3600 IN TXT "v=DKIM1; k=ed25519; p=' in records
    assert "s1._domainkey.customer.example." in records
    before = (site.keys / "customer.example" / "s1.key").read_bytes()
    subprocess.run(
        [sys.executable, "-m", "deploykit", "dkim-keys", str(site.inventory)],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=KIT,
    )
    assert (site.keys / "customer.example" / "s1.key").read_bytes() == before  # never replaced


def test_loading_makes_no_dkim_key_only_the_command_does(site: Site) -> None:
    """Keys are made on purpose (the lab as production): loading reports the missing key,
    ``python -m deploykit dkim-keys`` makes it."""
    site.good["dkim_domains"].append(
        {"domain": "lab.example", "selector": "lab", "algorithm": "ed25519"}
    )
    problem = one(site.problems(), "lab.example")
    assert problem.startswith(f"{site.file('good.py')}: group good: dkim_domains[1] (lab.example):")
    assert f"{site.keys}/lab.example/lab.key does not exist" in problem
    assert "python -m deploykit dkim-keys" in problem
    assert not (site.keys / "lab.example").exists()
    assert not (site.keys / "dns-records.txt").exists()
    done = subprocess.run(
        [sys.executable, "-m", "deploykit", "dkim-keys", str(site.inventory)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=KIT,
    )
    assert done.returncode == 0, done.stderr
    assert (site.keys / "lab.example" / "lab.key").is_file()
    assert "lab._domainkey.lab.example." in (site.keys / "dns-records.txt").read_text()
    fleet = load_inventory(site.inventory)
    assert [k["domain"] for k in fleet.relay_configs["otc-de-mta01"]["dkim"]["keys"]] == [
        "customer.example",
        "lab.example",
    ]


def test_a_dkim_key_of_the_wrong_kind_or_mode_is_refused(site: Site) -> None:
    site.good["dkim_domains"][0]["algorithm"] = "rsa"
    assert "is an ed25519 key, the inventory says rsa" in one(site.problems(), "dkim_domains")
    site.good["dkim_domains"][0]["algorithm"] = "ed25519"
    (site.keys / "customer.example" / "s1.key").chmod(0o644)
    assert "readable by others" in one(site.problems(), "dkim_domains")


def test_the_same_dkim_selector_twice_is_refused(site: Site) -> None:
    site.good["dkim_domains"].append(dict(site.good["dkim_domains"][0]))
    assert "is also dkim_domains[0]" in one(site.problems(), r"dkim_domains\[1\]")


def test_conflicting_tls_rules_name_both_entries(site: Site) -> None:
    site.all["tls_rules"].append(
        {"sender": "Customer.Example.", "recipient": "partner.example", "level": "encrypt"}
    )
    assert one(site.problems(), "conflicts") == (
        f"{site.file('all.py')}: group all: tls_rules[2]: conflicts with tls_rules[0]: both are "
        "for sender 'customer.example' and recipient 'partner.example'"
    )


def test_a_tls_rule_with_an_unknown_level_is_refused_by_the_relay_schema(site: Site) -> None:
    site.all["tls_rules"][0]["level"] = "strict"
    problem = one(site.problems(), "level")
    assert problem.startswith(f"{site.file('all.py')}: group all: tls_rules[0].level:")
    assert "tls_policy.rules[0].level" in problem


def test_no_bad_gateway_is_refused(site: Site) -> None:
    site.groups = {"good": list(HOSTS)}
    assert one(site.problems(), "no bad gateway") == (
        f"{site.file('site.py')}: bad: no bad gateway: spam must leave through one"
    )


def test_a_host_in_both_groups_or_an_unknown_group_is_refused(site: Site) -> None:
    site.groups["bad"].append("otc-de-mta02")
    site.groups["web"] = ["otc-de-mta01"]
    problems = site.problems()
    assert "otc-de-mta02: the host is in both good and bad" in one(problems, "both good")
    assert "unknown group 'web'" in one(problems, "web")


def test_placeholders_are_refused_until_set(site: Site) -> None:
    site.hosts["otc-de-mta03"]["public_address"] = "REPLACE-ME: the bad gateway's address"
    site.good["customer_networks"] = ["REPLACE-ME"]
    problems = site.problems()
    assert one(problems, "otc-de-mta03: public_address").endswith(
        "is a placeholder: set the real value"
    )
    assert one(problems, "customer_networks").startswith(
        f"{site.file('good.py')}: group good: customer_networks:"
    )


def test_per_host_keys_in_group_data_and_missing_host_keys(site: Site) -> None:
    site.all["fqdn"] = "mta.example.net"
    del site.hosts["otc-de-mta02"]["tls_key_file"]
    problems = site.problems()
    assert one(problems, "group all: fqdn").endswith("is set per host, not for a group")
    assert one(problems, "tls_key_file").startswith(
        f"{site.file('site.py')}: good[1] otc-de-mta02: tls_key_file: required key is missing"
    )


def test_duplicate_addresses_and_unknown_monitor_hosts(site: Site) -> None:
    site.hosts["otc-de-mta02"]["public_address"] = "2001:db8:10::1"
    site.all["blacklist_monitor_hosts"] = ["otc-de-mta09"]
    problems = site.problems()
    assert "2001:db8:10::1 is also otc-de-mta01's public_address" in one(problems, "is also otc")
    assert "'otc-de-mta09' is not a host of this inventory" in one(problems, "mta09")


def test_a_certificate_for_another_host_or_key_is_refused(site: Site, ca: TestCA) -> None:
    other = ca.valid("otc-de-mta99.example.net")
    site.hosts["otc-de-mta01"]["tls_cert_file"] = str(other.cert_path)
    problem = one(site.problems(), "tls_cert_file")
    assert "does not belong to the key" in problem
    site.hosts["otc-de-mta01"]["tls_key_file"] = str(other.key_path)
    assert "names neither otc-de-mta01.mms.example.net nor 2001:db8:10::1" in one(
        site.problems(), "tls_cert_file"
    )


def test_a_bad_gateway_certificate_without_its_address_is_refused(site: Site, ca: TestCA) -> None:
    """The good gateways connect to the bad gateway by address and verify that address: a
    certificate naming only the FQDN would leave spam waiting until it bounces (issue 12)."""
    fqdn_only = ca.valid("otc-de-mta03.mms.example.net")
    site.hosts["otc-de-mta03"]["tls_cert_file"] = str(fqdn_only.cert_path)
    site.hosts["otc-de-mta03"]["tls_key_file"] = str(fqdn_only.key_path)
    problem = one(site.problems(), "otc-de-mta03: tls_cert_file")
    assert "has no IP address entry 2001:db8:10::3 in its subjectAltName" in problem
    assert "routing.bad_gateways" in problem


def test_a_good_gateway_certificate_may_name_only_its_fqdn(site: Site, ca: TestCA) -> None:
    fqdn_only = ca.valid("otc-de-mta01.mms.example.net")
    site.hosts["otc-de-mta01"]["tls_cert_file"] = str(fqdn_only.cert_path)
    site.hosts["otc-de-mta01"]["tls_key_file"] = str(fqdn_only.key_path)
    assert site.load().get("otc-de-mta01").role == "good"


def test_a_certificate_near_its_end_is_a_warning_not_a_refusal(
    site: Site, ca: TestCA, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ending = ca.issue(
        ["otc-de-mta02.mms.example.net", "2001:db8:10::2"],
        not_after=now + datetime.timedelta(days=10, hours=1),
    )
    site.hosts["otc-de-mta02"]["tls_cert_file"] = str(ending.cert_path)
    site.hosts["otc-de-mta02"]["tls_key_file"] = str(ending.key_path)
    fleet = site.load()
    [warning] = [w.render() for w in fleet.warnings if "tls_cert_file" in w.entry]
    assert "otc-de-mta02: tls_cert_file" in warning
    assert "in 10 days (renew it when fewer than 21 days are left)" in warning
    print_warnings(fleet)
    assert capsys.readouterr().err.startswith("warning: ")


def test_ssh_networks_must_be_named_and_the_whole_internet_is_a_warning(site: Site) -> None:
    """No default opens SSH to the world (issue 12): the inventory must say where from."""
    del site.all["ssh_networks"]
    assert "ssh_networks: required key is missing" in one(site.problems(), "otc-de-mta01: ssh")
    site.all["ssh_networks"] = ["0.0.0.0/0", "2001:db8:ff::/64"]
    warnings = [w.render() for w in site.load().warnings if "ssh_networks" in w.entry]
    assert len(warnings) == 3  # one per host
    assert "0.0.0.0/0 opens SSH on otc-de-mta01 to the whole internet" in warnings[0]


def test_the_relays_config_warnings_reach_the_deploy(site: Site) -> None:
    """What the relay would log as a warning at start shows before the deploy, once, under
    the inventory entry it came from (here a rule for every recipient over MTA-STS)."""
    [warning] = [w.render() for w in site.load().warnings if "tls_rules" in w.entry]
    assert (
        "group all: tls_rules[1]: the relay warns on otc-de-mta01, otc-de-mta02, otc-de-mta03"
        in (warning)
    )
    assert "shadows MTA-STS" in warning


def test_missing_files_are_named(site: Site) -> None:
    site.all["internal_ca_file"] = "/nonexistent/ca.crt"
    assert one(site.problems(), "internal_ca_file") == (
        f"{site.file('all.py')}: group all: internal_ca_file: /nonexistent/ca.crt: no such file"
    )


def test_a_value_the_relay_refuses_is_traced_to_relay_settings(site: Site) -> None:
    site.bad = {"relay_settings": {"delivery": {"concurrency": "many"}}}
    problem = one(site.problems(), "relay_settings")
    assert problem.startswith(f"{site.file('bad.py')}: group bad: relay_settings:")
    assert "otc-de-mta03: delivery.concurrency: expected a whole number" in problem


def test_all_problems_are_reported_at_once(site: Site) -> None:
    site.all["operation_mailbox"] = "x@example.net"
    site.all["timezone"] = "Mars/Olympus"
    site.groups = {"good": list(HOSTS)}
    assert len(site.problems()) == 3


# --- the shipped inventories ----------------------------------------------------------------


def test_production_is_refused_until_its_placeholders_are_set() -> None:
    with pytest.raises(InventoryError) as caught:
        load_inventory(KIT / "inventories" / "production.py")
    rendered = caught.value.render()
    for name in ("otc-de-mta01", "otc-de-mta02", "otc-de-mta03"):
        assert (
            f"inventories/production.py: {'bad[0]' if name.endswith('3') else 'good'}" in rendered
        )
        assert f"{name}: public_address:" in rendered
    assert "inventories/group_data/good.py: group good: customer_networks:" in rendered


def test_production_is_valid_once_the_placeholders_are_set(tmp_path: Path, ca: TestCA) -> None:
    """The shipped production inventory, with addresses, networks and certificates filled in."""
    copy = tmp_path / "inventories"
    shutil.copytree(KIT / "inventories", copy)
    text = (copy / "production.py").read_text()
    for index, name in enumerate(("otc-de-mta01", "otc-de-mta02", "otc-de-mta03"), start=1):
        address = f"2001:db8:20::{index}"
        text = text.replace(f"REPLACE-ME: {name}'s public IPv4 or IPv6 address", address)
        leaf = ca.valid(f"{name}.mms.t-systems-service.com", address)
        text = text.replace(f"keys/pki/{name}.crt", str(leaf.cert_path))
        text = text.replace(f"keys/pki/{name}.key", str(leaf.key_path))
    (copy / "production.py").write_text(text)
    good = (copy / "group_data" / "good.py").read_text()
    good = good.replace('["REPLACE-ME/customer-networks"]', '["10.0.0.0/8"]')
    (copy / "group_data" / "good.py").write_text(good)
    all_py = (copy / "group_data" / "all.py").read_text()
    all_py = all_py.replace('"keys/pki/internal-ca.crt"', repr(str(ca.ca_bundle)))
    all_py = all_py.replace('["REPLACE-ME/ssh-networks"]', '["2001:db8:ff::/64"]')
    (copy / "group_data" / "all.py").write_text(all_py)

    fleet = load_inventory(copy / "production.py")
    assert [g.name for g in fleet.bad] == ["otc-de-mta03"]
    mta03 = fleet.get("otc-de-mta03")
    assert mta03.fqdn == "otc-de-mta03.mms.t-systems-service.com"
    mta01 = parse_config(tomllib.loads(fleet.relay_toml("otc-de-mta01")))
    assert mta01.routing.bad_gateways == [("2001:db8:20::3", 25)]
    assert mta01.blacklist.operations_mailbox == "DD-OTC-SDM@telekom.de"
    assert mta01.blacklist.zones[0].zone == "zen.spamhaus.org"
    assert tomllib.loads(fleet.relay_toml("otc-de-mta01"))["gateway"]["listen"] == [
        "[2001:db8:20::1]:25",
        "127.0.0.1:25",
    ]


def fake_lab_state(root: Path, ca: TestCA) -> Path:
    """A lab/run/state.json as `python -m lab up` writes it (the keys lab.py reads)."""
    hosts = {}
    for index, (name, (role, _)) in enumerate(HOSTS.items()):
        address = f"198.51.100.{10 + index}"
        leaf = ca.valid(f"{name}.lab.example", name, address)
        hosts[name] = {
            "address": address,
            "fqdn": f"{name}.lab.example",
            "role": role,
            "cert": str(leaf.cert_path),
            "key": str(leaf.key_path),
        }
    state = {
        "network": "198.51.100.0/24",
        "bridge": {"name": "smglab0", "address": "198.51.100.1"},
        "ssh_key": str(root / "id_ed25519"),
        "hosts": hosts,
        "customer": {"address": "198.51.100.30"},
        "dns": {"address": "198.51.100.1", "dnsbl_zone": "dnsbl.lab.example"},
        "apt_proxy": "http://198.51.100.1:3142",
        "pki": {"ca_cert": str(ca.ca_bundle)},
    }
    path = root / "state.json"
    path.write_text(json.dumps(state))
    return path


def test_the_lab_inventory_is_the_same_fleet_with_lab_overrides(
    tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMG_LAB_STATE", str(fake_lab_state(tmp_path, ca)))
    fleet = load_inventory(KIT / "inventories" / "lab.py", check_keys=False)
    assert [(g.name, g.role, g.public_address) for g in fleet] == [
        ("otc-de-mta01", "good", "198.51.100.10"),
        ("otc-de-mta02", "good", "198.51.100.11"),
        ("otc-de-mta03", "bad", "198.51.100.12"),
    ]
    mta01 = fleet.get("otc-de-mta01")
    assert mta01["apt_proxy"] == "http://198.51.100.1:3142"
    assert mta01["customer_networks"] == []  # replaced by tenants (issue 11)
    assert [t["name"] for t in mta01["tenants"]] == ["customer-a", "customer-b", "customer-c"]
    assert mta01["auth_networks"] == ["198.51.100.40/29"]
    assert mta01["ssh_networks"] == ["198.51.100.1/32"]  # the control machine only
    assert mta01["operations_mailbox"] == "fmb-change@partner-plain.example"
    config = parse_config(tomllib.loads(fleet.relay_toml("otc-de-mta01")))
    # each gateway's own validating unbound (DANE), which asks the lab DNS
    assert config.dns.nameservers == [("127.0.0.1", 53)]
    assert mta01["local_resolver"] and mta01["resolvers"] == ["198.51.100.1"]
    assert [z.zone for z in config.blacklist.zones] == ["dnsbl.lab.example"]


def test_the_lab_inventory_says_when_the_lab_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMG_LAB_STATE", "/nonexistent/state.json")
    with pytest.raises(SystemExit, match="the lab is not up"):
        load_inventory(KIT / "inventories" / "lab.py")


# --- the command line and pyinfra -----------------------------------------------------------


def test_check_command_prints_the_problems_and_exits_1(site: Site) -> None:
    site.groups = {"good": list(HOSTS)}
    site.write()
    done = subprocess.run(
        [sys.executable, "-m", "deploykit", "check", str(site.inventory)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=KIT,
    )
    assert done.returncode == 1
    assert "no bad gateway" in done.stderr


def test_pyinfra_stops_at_a_broken_inventory_before_connecting(site: Site) -> None:
    site.all["operation_mailbox"] = "x@example.net"
    site.write()
    done = subprocess.run(
        [str(KIT / ".venv/bin/pyinfra"), str(site.inventory), str(KIT / "deploy.py"), "--dry"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=KIT,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "operation_mailbox: unknown key" in output
    assert "Connecting to hosts" not in output


def test_pyinfra_sees_the_same_hosts_groups_and_data(site: Site) -> None:
    site.site = {"timezone": "UTC"}
    site.write()
    done = subprocess.run(
        [str(KIT / ".venv/bin/pyinfra"), str(site.inventory), "debug-inventory"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=KIT,
    )
    assert done.returncode == 0, done.stderr
    fleet = load_inventory(site.inventory)
    for gateway in fleet:
        block = (done.stdout + done.stderr).split(f"[{gateway.name}]", 1)[1].split("\n[", 1)[0]
        assert f"Groups: {gateway.role}, site" in block
        assert '"timezone": "UTC"' in block


# --- TOML -----------------------------------------------------------------------------------


def test_toml_writer_round_trips_awkward_values() -> None:
    data = {
        "a": {
            "text": 'quote " backslash \\ tab \t del \x7f ü',
            "list": [1, 2.5, True, "x"],
            "rows": [{"k": "v", "codes": {"127.0.0.2": "listed"}}],
            "sub": {"n": 1},
        }
    }
    text = to_toml(data)
    assert tomllib.loads(text) == data
