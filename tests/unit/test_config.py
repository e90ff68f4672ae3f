"""The configuration schema: values, defaults, errors naming file and key, and the docs."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import typing
from pathlib import Path

import pytest

from gateway.cli import main as smg
from gateway.config import Config, ConfigError, load_config, parse_config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
MINIMAL = {"gateway": {"hostname": "gw.example.net", "role": "bad"}}


def problems(data: dict, source: str = "<memory>") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source)
    return [f"{p.key}: {p.message}" for p in info.value.problems]


def test_minimal_config_gets_the_documented_defaults() -> None:
    config = parse_config(MINIMAL)
    gateway = config.gateway
    assert gateway.listen == [("127.0.0.1", 2525)]
    assert gateway.max_message_size == 25 * 1024 * 1024
    assert gateway.client_networks == [ipaddress.ip_network("127.0.0.0/8")]
    assert (gateway.idle_timeout, gateway.data_timeout) == (300.0, 600.0)
    assert (gateway.max_recipients, gateway.max_connections, gateway.max_line_length) == (
        100,
        200,
        998,
    )
    assert config.dns.nameservers == [] and config.dns.negative_ttl_max == 900.0
    assert config.delivery.port == 25 and config.delivery.max_lifetime == 5 * 86400


def test_issue_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "smg.toml"
    path.write_text(
        """
[gateway]
role = "good"
hostname = "otc-de-mta01.example.net"
listen = ["127.0.0.1:2525"]
source_address = "127.0.0.1"
spool = "/var/spool/smg"
max_message_size = "25MiB"
client_networks = ["127.0.0.0/8"]
[dns]
nameservers = ["127.0.0.1:5353"]
extra_public_networks = []
[delivery]
port = 25
[spam]
enabled = false
"""
    )
    config = load_config(path)
    assert config.source == str(path)
    assert config.dns.nameservers == [("127.0.0.1", 5353)]
    assert config.gateway.source_address == "127.0.0.1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("25MiB", 25 * 2**20), ("10MB", 10**7), (2048, 2048), ("1 KiB", 1024), ("2000b", 2000)],
)
def test_sizes(value: object, expected: int) -> None:
    data = {"gateway": {**MINIMAL["gateway"], "max_message_size": value}}
    assert parse_config(data).gateway.max_message_size == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0), ("250ms", 0.25), (7, 7.0)],
)
def test_durations(value: object, expected: float) -> None:
    # A key whose bound (at most 30d) admits every form; idle_timeout stops at 1h now.
    data = {**MINIMAL, "delivery": {"max_lifetime": value}}
    assert parse_config(data).delivery.max_lifetime == expected


def test_every_error_at_once_with_keys() -> None:
    found = problems(
        {
            "gateway": {
                "role": "ugly",
                "max_message_size": "lots",
                "listen": ["127.0.0.1"],
                "client_networks": ["10.0.0.0/8", "0.0.0.0/0", "banana"],
                "max_recipients": 0,
                "colour": "blue",
            },
            "dns": {"timeout": "soon", "nameservers": ["127.0.0.1:99999"]},
            "delivery": {"port": 0},
            "bogus": {},
        }
    )
    joined = "\n".join(found)
    for key in (
        "gateway.hostname: required key is missing",
        "gateway.role: must be one of 'good', 'bad'",
        "gateway.max_message_size: expected a size",
        "gateway.listen: item 0: expected HOST:PORT (the port is missing)",
        "gateway.client_networks: item 2: expected a network",
        "gateway.max_recipients: must be at least 1",
        "gateway.colour: unknown key",
        "dns.timeout: expected a duration",
        "dns.nameservers: item 0: port must be 1-65535",
        "delivery.port: must be between 1 and 65535",
        "bogus: unknown key",
    ):
        assert key in joined, joined


def test_cross_checks() -> None:
    found = problems(
        {
            "gateway": {
                "hostname": "gw.example.net",
                "client_networks": ["0.0.0.0/0", "::/0", "10.0.0.0/8"],
                "tls_cert": "/etc/smg/cert.pem",
                "max_message_size": 100,
            }
        }
    )
    assert "gateway.client_networks[0]: 0.0.0.0/0 is too wide" in "\n".join(found)
    assert any(p.startswith("gateway.client_networks[1]: ::/0 is too wide") for p in found)
    assert "gateway.tls_cert: tls_cert and tls_key go together" in found
    assert "gateway.max_message_size: must be at least 1KiB (1024 bytes)" in found
    assert any(p.startswith("routing.bad_gateways: a good gateway") for p in found)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "nope.toml")
    assert missing.value.render().startswith(f"{tmp_path / 'nope.toml'}: cannot read")
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway\n")
    with pytest.raises(ConfigError) as bad:
        load_config(broken)
    assert f"{broken}: not valid TOML" in bad.value.render()


def test_config_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[gateway]\nhostname = "gw.example.net"\nrole = "bad"\n')
    assert smg(["config", "validate", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: OK"
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nrole = "ugly"\nmax_connections = -1\n')
    assert smg(["config", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: gateway.hostname: required key is missing" in err
    assert f"{bad}: gateway.role: must be one of" in err
    assert f"{bad}: gateway.max_connections: must be at least 1" in err
    assert err.strip().endswith(f"{bad}: 3 errors")


# --- docs/configuration.md stays true --------------------------------------------------------


def _schema_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if spec.name == "source":
            continue
        hint = hints[spec.name]
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
        if dataclasses.is_dataclass(hint):
            keys += _schema_keys(hint, f"{prefix}{spec.name}.")
        elif dataclasses.is_dataclass(inner):
            keys.append(f"{prefix}{spec.name}")
            keys += _schema_keys(inner, f"{prefix}{spec.name}[].")
        else:
            keys.append(f"{prefix}{spec.name}")
    return keys


def documented_key(section: str, key: str) -> str:
    """``[[tenants]]`` is a list of tables: its rows ``name`` are ``tenants[].name``, and the
    section itself is the key ``tenants``."""
    if section.startswith("[") and section.endswith("]"):
        return f"{section[1:-1]}[].{key}"
    return f"{section}.{key}"


def test_every_key_is_documented() -> None:
    text = DOCS.read_text()
    sections = re.split(r"^## `\[(\[?\w+\]?)\]`", text, flags=re.M)
    documented: set[str] = set()
    for name, body in zip(sections[1::2], sections[2::2], strict=True):
        if name.startswith("["):
            documented.add(name[1:-1])
        for key in re.findall(r"^\| `([\w.\[\]]+)` \|", body, flags=re.M):
            documented.add(documented_key(name, key))
    missing = [key for key in _schema_keys(Config, "") if key not in documented]
    assert not missing, f"keys without a row in docs/configuration.md: {missing}"


def test_documented_example_is_valid() -> None:
    example = re.search(r"## A complete example.*?```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert example is not None
    import tomllib

    config = parse_config(tomllib.loads(example.group(1)), "docs/configuration.md")
    assert config.gateway.role == "good" and config.dkim.keys[0].selector == "smg2024"
