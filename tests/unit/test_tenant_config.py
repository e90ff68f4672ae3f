"""[[tenants]] and [tenant_defaults]: the schema, every validation error (naming file, key and
customer), and the scrypt password hashes."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.config.tenancy import effective_limits, owns, owns_pattern
from gateway.passwords import hash_password, parse_hash, verify

HASH = hash_password("s3cret", log2_n=10)  # cheap in tests; the parameters are in the hash

BASE: dict[str, Any] = {
    "gateway": {
        "hostname": "gw.example.net",
        "tls_cert": "/etc/smg/cert.pem",
        "tls_key": "/etc/smg/key.pem",
        "auth_networks": ["198.51.100.40/29"],
        "operations_mailbox": "ops@example.net",
    },
    "spam": {"enabled": False},
    "tenant_defaults": {"messages_per_hour": 1000},
    "tenants": [
        {
            "name": "customer-a",
            "networks": ["198.51.100.30/32", "2001:db8:30::/48"],
            "domains": ["customer-a.example", ".sub.customer-a.example"],
            "limits": {"messages_per_hour": 100, "max_message_size": "1MiB"},
            "dkim": [{"domain": "customer-a.example", "selector": "smg2026", "key": "/k/a"}],
            "tls_rules": [
                {"sender": "customer-a.example", "recipient": "p.example", "level": "verify"}
            ],
        },
        {
            "name": "customer-b",
            "networks": ["198.51.100.31/32"],
            "domains": ["customer-b.example"],
        },
        {
            "name": "customer-c",
            "domains": ["customer-c.example"],
            "auth": [{"user": "relay@customer-c.example", "password_hash": HASH}],
        },
    ],
}


def with_change(path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "smg.toml")
    return info.value.render().splitlines()


def test_the_contract_example_loads() -> None:
    config = parse_config(copy.deepcopy(BASE), "smg.toml")
    a, b, c = config.tenants
    assert a.name == "customer-a" and a.networks[1] == ipaddress.ip_network("2001:db8:30::/48")
    assert a.domains == ["customer-a.example", ".sub.customer-a.example"]
    assert c.auth[0].user == "relay@customer-c.example"
    limits = effective_limits(config.tenant_defaults, a.limits)
    assert (limits.messages_per_hour, limits.max_message_size) == (100, 1024 * 1024)
    assert effective_limits(config.tenant_defaults, b.limits).messages_per_hour == 1000
    assert config.gateway.auth_networks == [ipaddress.ip_network("198.51.100.40/29")]
    assert config.gateway.operations_mailbox == "ops@example.net"
    assert (config.gateway.session_deadline, config.gateway.command_deadline) == (3600, 60)


def test_no_tenants_is_the_old_config() -> None:
    config = parse_config({"gateway": {"hostname": "gw.example.net", "role": "bad"}})
    assert config.tenants == [] and config.gateway.auth_networks == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["tenants", 1, "networks"], ["198.51.100.30/31"],
         "smg.toml: tenants[0].networks[0]: 198.51.100.30/32 of customer 'customer-a' overlaps "
         "198.51.100.30/31 of customer 'customer-b'"),
        (["tenants", 1, "networks"], ["2001:db8:30:5::/64"],
         "smg.toml: tenants[1].networks[0]: 2001:db8:30:5::/64 of customer 'customer-b' overlaps"
         " 2001:db8:30::/48 of customer 'customer-a'"),
        (["tenants", 1, "domains"], ["customer-a.example"],
         "smg.toml: tenants[1].domains[0]: domain customer-a.example of customer 'customer-b' is "
         "also owned by customer 'customer-a'"),
        (["tenants", 1, "domains"], ["x.sub.customer-a.example"],
         "smg.toml: tenants[1].domains[0]: domain x.sub.customer-a.example of customer "
         "'customer-b' is also owned by customer 'customer-a'"),
        (["tenants", 1, "dkim"], [{"domain": "customer-a.example", "selector": "s", "key": "/k"}],
         "smg.toml: tenants[1].dkim[0].domain: customer 'customer-b' does not own domain "
         "customer-a.example"),
        (["tenants", 1, "dkim"], [{"domain": "customer-b.example", "selector": "a b",
                                   "key": "/k"}],
         "smg.toml: tenants[1].dkim[0].selector: invalid selector 'a b' of customer 'customer-b'"),
        (["tenants", 1, "tls_rules"], [{"sender": "customer-a.example", "recipient": "*"}],
         "smg.toml: tenants[1].tls_rules[0].sender: customer 'customer-b' does not own domain "
         "customer-a.example"),
        (["tenants", 1, "tls_rules"], [{"sender": "*", "recipient": "x.example"}],
         "smg.toml: tenants[1].tls_rules[0].sender: customer 'customer-b' does not own domain *"),
        (["tenants", 1, "auth"], [{"user": "relay@customer-c.example", "password_hash": HASH}],
         "smg.toml: tenants[2].auth[0].user: user relay@customer-c.example of customer "
         "'customer-c' is also a user of customer 'customer-b'"),
        (["tenants", 1, "name"], "customer-a",
         "smg.toml: tenants[1].name: customer 'customer-a' is also tenants[0]"),
        (["tenants", 1, "networks"], [],
         "smg.toml: tenants[1]: customer 'customer-b' has neither networks nor auth users: no "
         "host could send as it"),
        (["tenants", 1, "domains"], [],
         "smg.toml: tenants[1].domains: customer 'customer-b' needs at least one domain"),
        (["tenants", 1, "networks"], ["10.0.0.0/7"],
         "smg.toml: tenants[1].networks[0]: 10.0.0.0/7 of customer 'customer-b' is too wide"),
        (["tenants", 0, "limits", "max_message_size"], "1GiB",
         "smg.toml: tenants[0].limits.max_message_size: customer 'customer-a': more than "
         "gateway.max_message_size"),
        (["gateway", "auth_networks"], ["0.0.0.0/0"],
         "smg.toml: gateway.auth_networks[0]: 0.0.0.0/0 is too wide"),
    ],
)  # fmt: skip
def test_cross_check_errors_name_file_key_and_customer(
    path: list[Any], value: Any, expected: str
) -> None:
    lines = errors(with_change(path, value))
    assert any(line.startswith(expected) for line in lines), lines


def test_auth_needs_a_tls_certificate() -> None:
    data = copy.deepcopy(BASE)
    del data["gateway"]["tls_cert"], data["gateway"]["tls_key"]
    assert errors(data) == [
        "smg.toml: tenants[2].auth: customer 'customer-c' has auth users but the gateway has no "
        "tls_cert: AUTH is offered only after STARTTLS"
    ]


def test_auth_networks_without_users() -> None:
    data = copy.deepcopy(BASE)
    data["tenants"][2]["auth"] = []
    data["tenants"][2]["networks"] = ["198.51.100.50/32"]
    assert errors(data) == [
        "smg.toml: gateway.auth_networks: no tenant has auth users: nobody could log in"
    ]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["tenants", 0, "name"], "Customer A", "tenants[0].name: expected a name of a-z"),
        (["tenants", 2, "auth", 0, "password_hash"], "s3cret",
         "tenants[2].auth[0].password_hash: expected a hash made by 'smg tenant hash-password'"),
        (["tenants", 0, "domains"], ["not a domain"], "tenants[0].domains: item 0: not a valid"),
        (["tenants", 0, "limits", "messages_per_hour"], 0,
         "tenants[0].limits.messages_per_hour: must be at least 1"),
        (["tenants", 0, "limits", "colour"], 1, "tenants[0].limits.colour: unknown key"),
        (["tenant_defaults", "suspend_spam_share"], 1.5,
         "tenant_defaults.suspend_spam_share: must be between 0.01 and 1"),
        (["tenant_defaults", "suspend_window"], "10s",
         "tenant_defaults.suspend_window: must be at least 1m"),
        (["gateway", "command_deadline"], "0s", "gateway.command_deadline: must be more than 0"),
        (["gateway", "operations_mailbox"], "ops", "gateway.operations_mailbox: expected a mail"),
    ],
)  # fmt: skip
def test_value_errors_name_the_key(path: list[Any], value: Any, expected: str) -> None:
    lines = errors(with_change(path, value))
    assert any(line.startswith(f"smg.toml: {expected}") for line in lines), lines


def test_smg_config_validate_lists_tenant_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main as smg

    path = tmp_path / "smg.toml"
    path.write_text(
        '[gateway]\nhostname = "gw.example.net"\n[spam]\nenabled = false\n'
        '[[tenants]]\nname = "a"\nnetworks = ["192.0.2.0/24"]\ndomains = ["a.example"]\n'
        '[[tenants]]\nname = "b"\nnetworks = ["192.0.2.128/25"]\ndomains = [".a.example"]\n'
        'dkim = [{ domain = "a.example", selector = "s", key = "/k" }]\n'
    )
    assert smg(["config", "validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: tenants[1].dkim[0].domain: customer 'b' does not own domain a.example" in err
    assert f"{path}: tenants[1].networks[0]: 192.0.2.128/25 of customer 'b' overlaps" in err
    assert err.strip().endswith("2 errors")


def test_ownership() -> None:
    domains = ["a.example", ".sub.a.example"]
    assert owns(domains, "a.example") and owns(domains, "x.sub.a.example")
    assert not owns(domains, "sub.a.example") and not owns(domains, "b.a.example")
    assert owns_pattern(domains, "x.sub.a.example") and owns_pattern(domains, ".x.sub.a.example")
    assert owns_pattern(domains, ".sub.a.example")
    assert not owns_pattern(domains, ".a.example") and not owns_pattern(domains, "*")


def test_password_hashes() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("$scrypt$ln=14,r=8,p=1$")
    assert verify("correct horse", stored) and not verify("wrong", stored)
    assert verify(b"correct horse", stored)
    assert hash_password("x", log2_n=10) != hash_password("x", log2_n=10)  # salted
    assert not verify("x", "$scrypt$garbage") and not verify("x", "x")
    log2_n, r, p, salt, digest = parse_hash(stored)
    assert (log2_n, r, p, len(salt), len(digest)) == (14, 8, 1, 16, 32)
