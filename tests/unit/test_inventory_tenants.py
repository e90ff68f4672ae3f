"""Inventory tenants (issue 11): the checks that keep one customer from acting as another, each
naming file, key and customer, and what deploykit renders from them (the relay config, the
firewall's sources, the DKIM keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploykit.dkim_keys import dkim_wanted
from gateway.passwords import hash_password
from roles import dkim as dkim_role
from roles.firewall import smtp_sources
from tests.unit.test_inventory import Site, one
from tests.unit.test_inventory import ca as ca  # the module's fixtures
from tests.unit.test_inventory import site as site

HASH = hash_password("secret-of-c", log2_n=10)


def customers() -> list[dict[str, Any]]:
    return [
        {
            "name": "customer-a",
            "networks": ["10.20.0.0/16"],
            "domains": ["customer.example", ".customer.example"],
            "limits": {"messages_per_hour": 5},
            "dkim": [{"domain": "customer.example", "selector": "s1", "algorithm": "ed25519"}],
            "tls_rules": [
                {
                    "sender": "customer.example",
                    "recipient": "partner-x.example",
                    "level": "verify",
                    "on_failure": "hold",
                },
            ],
        },
        {"name": "customer-b", "networks": ["10.30.0.0/16"], "domains": ["b.example"]},
        {
            "name": "customer-c",
            "domains": ["c.example"],
            "auth": [{"user": "relay@c.example", "password_hash": HASH}],
        },
    ]


def with_tenants(site: Site) -> Site:
    site.good = {"customer_networks": [], "tenants": customers(), "auth_networks": ["10.40.0.0/29"],
                 "tenant_defaults": {"max_sessions": 7}}  # fmt: skip
    return site


def test_tenants_render_into_the_good_gateways_config_with_a_loopback_tenant(site: Site) -> None:
    fleet = with_tenants(site).load()
    good = fleet.relay_configs["otc-de-mta01"]
    names = [t["name"] for t in good["tenants"]]
    assert names == ["customer-a", "customer-b", "customer-c", "smg-local"]
    local = good["tenants"][-1]
    assert local["networks"] == ["127.0.0.1/32", "::1/128"]
    assert local["domains"] == ["otc-de-mta01.mms.example.net"]  # <tool>@<fqdn> submits here
    assert good["tenants"][0]["dkim"] == [
        {"domain": "customer.example", "selector": "s1",
         "key": "/etc/smg/dkim/customer.example.s1.key"}
    ]  # fmt: skip
    assert good["tenants"][0]["limits"] == {"messages_per_hour": 5}
    assert good["tenant_defaults"] == {"max_sessions": 7}
    assert good["gateway"]["auth_networks"] == ["10.40.0.0/29"]
    assert good["gateway"]["operations_mailbox"] == "DD-OTC-SDM@telekom.de"
    # customer_networks is the union of the tenants' networks
    assert good["gateway"]["client_networks"] == ["10.20.0.0/16", "10.30.0.0/16", "127.0.0.0/8"]


def test_the_bad_gateway_gets_every_tenants_tls_rules_and_no_tenants(site: Site) -> None:
    fleet = with_tenants(site).load()
    bad = fleet.relay_configs["otc-de-mta03"]
    assert "tenants" not in bad
    recipients = [r["recipient"] for r in bad["tls_policy"]["rules"]]
    assert recipients == ["partner.example", "*", "partner-x.example"]


def test_firewall_opens_smtp_to_tenant_and_auth_networks(site: Site) -> None:
    fleet = with_tenants(site).load()
    _, sources = smtp_sources(fleet, fleet.get("otc-de-mta01"))
    assert sources == ["10.20.0.0/16", "10.30.0.0/16", "10.40.0.0/29"]


def test_tenant_dkim_keys_are_made_and_shipped(site: Site) -> None:
    site = with_tenants(site)
    site.good["tenants"][1]["dkim"] = [{"domain": "b.example", "selector": "s9"}]
    site.add_key("b.example", "s9", "rsa")
    fleet = site.load()
    assert ("b.example", "s9") in dkim_wanted(fleet)
    wanted = dkim_role.wanted_keys(fleet.get("otc-de-mta01"))
    assert any(str(src).endswith("b.example/s9.key") for src in wanted.values())


def test_a_tenant_dkim_key_missing_names_the_customer(site: Site) -> None:
    site = with_tenants(site)
    site.good["tenants"][1]["dkim"] = [{"domain": "b.example", "selector": "nokey"}]
    problem = one(site.problems(), r"tenants\[1\]\.dkim\[0\]")
    assert "customer 'customer-b'" in problem and "dkim-keys" in problem


def test_overlapping_networks_between_customers_are_refused(site: Site) -> None:
    site = with_tenants(site)
    site.good["tenants"][1]["networks"] = ["10.20.5.0/24"]
    problem = one(site.problems(), r"overlaps")
    assert problem.startswith(f"{site.file('good.py')}: group good: tenants[1].networks[0]")
    assert "'customer-b'" in problem and "'customer-a'" in problem


def test_a_domain_of_two_customers_is_refused(site: Site) -> None:
    site = with_tenants(site)
    site.good["tenants"][1]["domains"] = ["b.example", "x.customer.example"]
    problem = one(site.problems(), r"also owned")
    assert problem.startswith(f"{site.file('good.py')}: group good: tenants[1].domains[1]")
    assert "'customer-a'" in problem


@pytest.mark.parametrize("key", ["dkim", "tls_rules"])
def test_a_key_or_rule_for_a_domain_not_owned_is_refused(site: Site, key: str) -> None:
    site = with_tenants(site)
    if key == "dkim":
        site.good["tenants"][1]["dkim"] = [
            {"domain": "customer.example", "selector": "s1", "algorithm": "ed25519"}
        ]
    else:
        site.good["tenants"][1]["tls_rules"] = [
            {"sender": "customer.example", "recipient": "*", "level": "encrypt"}
        ]
    problem = one(site.problems(), rf"tenants\[1\]\.{key}\[0\]")
    assert "customer 'customer-b' does not own domain customer.example" in problem
    assert problem.startswith(f"{site.file('good.py')}: group good:")


def test_a_clear_text_password_is_refused(site: Site) -> None:
    site = with_tenants(site)
    site.good["tenants"][2]["auth"] = [{"user": "relay@c.example", "password": "hunter2"}]
    problem = one(site.problems(), r"tenants")
    assert problem.startswith(f"{site.file('good.py')}: group good: tenants")
    assert "customer 'customer-c'" in problem and "clear text password" in problem
    assert "hunter2" not in problem


def test_tenants_and_the_old_customer_networks_together_are_refused(site: Site) -> None:
    site = with_tenants(site)
    site.good["customer_networks"] = ["10.99.0.0/16"]
    assert "migration" in one(site.problems(), r"customer_networks")


def test_the_old_customer_networks_alone_still_work(site: Site) -> None:
    config = site.load().relay_configs["otc-de-mta01"]
    assert "tenants" not in config
    assert config["gateway"]["client_networks"][:2] == ["10.20.0.0/16", "2001:db8:99::/48"]


def test_the_loopback_tenant_name_is_reserved(site: Site) -> None:
    site = with_tenants(site)
    site.good["tenants"][1]["name"] = "smg-local"
    assert "loopback tenant" in one(site.problems(), r"tenants")


def test_placeholder_in_a_tenant_is_refused(tmp_path: Path, site: Site) -> None:
    site = with_tenants(site)
    site.good["tenants"][0]["networks"] = ["REPLACE-ME"]
    assert "placeholder" in one(site.problems(), r"tenants")
