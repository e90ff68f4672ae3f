"""Every key has a bound (issue 12, point 3): the dangerous configs of the issue are refused
naming file and key, a rule that shadows MTA-STS is a warning (exit 0), and each key's row in
docs/configuration.md states its bound."""

from __future__ import annotations

import logging
import re
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main as smg
from gateway.config import Config, ConfigError, config_warnings, load_config, parse_config
from gateway.config.bounds import max_message_size, spool_length_limit
from gateway.server import _log_config_warnings
from tests.unit.test_config import DOCS, MINIMAL, _schema_keys, documented_key

GATEWAY = MINIMAL["gateway"]


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "smg.toml")
    return caught.value.render().splitlines()


# (section, key, value, the key the error names, words of the message): the list first.
REFUSED = [
    ("gateway", "idle_timeout", 0, "gateway.idle_timeout", "more than 0"),
    ("gateway", "idle_timeout", "0s", "gateway.idle_timeout", "more than 0"),
    ("gateway", "data_timeout", 0, "gateway.data_timeout", "more than 0"),
    ("routing", "verdict_header", "From", "routing.verdict_header", "standard header field"),
    ("routing", "verdict_header", "content-type", "routing.verdict_header", "standard"),
    ("routing", "verdict_header", "DKIM-Signature", "routing.verdict_header", "standard"),
    ("routing", "verdict_header", "X Verdict", "routing.verdict_header", "field name"),
    ("routing", "verdict_header", "X-Verdict:", "routing.verdict_header", "field name"),
    ("spam", "spam_score", float("nan"), "spam.spam_score", "finite"),
    ("spam", "spam_score", float("inf"), "spam.spam_score", "finite"),
    ("gateway", "client_networks", ["2001:db8::/16"], "gateway.client_networks[0]", "/48"),
    ("gateway", "client_networks", ["2001:db8::/47"], "gateway.client_networks[0]", "too wide"),
    ("gateway", "client_networks", ["10.0.0.0/7"], "gateway.client_networks[0]", "too wide"),
    ("gateway", "metrics_listen", "0.0.0.0:9925", "gateway.metrics_listen", "loopback"),
    ("gateway", "metrics_listen", "[::]:9925", "gateway.metrics_listen", "metrics_public"),
    ("gateway", "max_message_size", "4GiB", "gateway.max_message_size", "spool"),
    ("delivery", "retry_initial", 0, "delivery.retry_initial", "more than 0"),
    ("delivery", "max_lifetime", 0, "delivery.max_lifetime", "more than 0"),
    # their kin
    ("delivery", "retry_max", "0s", "delivery.retry_max", "more than 0"),
    ("delivery", "connect_timeout", 0, "delivery.connect_timeout", "more than 0"),
    ("delivery", "command_timeout", 0, "delivery.command_timeout", "more than 0"),
    ("delivery", "scan_interval", 0, "delivery.scan_interval", "more than 0"),
    ("delivery", "scan_interval", "1ms", "delivery.scan_interval", "at least 10ms"),
    ("delivery", "max_lifetime", "365d", "delivery.max_lifetime", "at most 30d"),
    ("delivery", "concurrency", 10**9, "delivery.concurrency", "at most 10000"),
    ("dns", "timeout", 0, "dns.timeout", "more than 0"),
    ("dns", "timeout", float("inf"), "dns.timeout", "finite"),
    ("dns", "nameservers", ["resolver.example:53"], "dns.nameservers", "IP address"),
    ("dns", "extra_public_networks", ["0.0.0.0/0"], "dns.extra_public_networks[0]", "too wide"),
    ("virus", "timeout", 0, "virus.timeout", "more than 0"),
    ("spam", "timeout", 0, "spam.timeout", "more than 0"),
    ("spam", "spam_score", "6", "spam.spam_score", "expected a number"),
    ("tls_policy", "hold_retry", 0, "tls_policy.hold_retry", "more than 0"),
    ("mta_sts", "fetch_timeout", 0, "mta_sts.fetch_timeout", "more than 0"),
    ("mta_sts", "https_port", 0, "mta_sts.https_port", "between 1 and 65535"),
    ("dkim", "headers", ["to", "subject"], "dkim.headers", "'from'"),
    ("dkim", "headers", ["from", "bad name"], "dkim.headers", "item 1"),
    ("blacklist", "notify_timeout", 0, "blacklist.notify_timeout", "more than 0"),
    ("blacklist", "nameservers", ["ns.example"], "blacklist.nameservers", "IP address"),
    ("gateway", "listen", [], "gateway.listen", "at least one"),
    ("gateway", "max_recipients", 10**6, "gateway.max_recipients", "at most 10000"),
    ("gateway", "max_line_length", 10**7, "gateway.max_line_length", "at most 65536"),
]


@pytest.mark.parametrize(("section", "key", "value", "named", "words"), REFUSED)
def test_dangerous_values_are_refused(
    section: str, key: str, value: Any, named: str, words: str
) -> None:
    data: dict[str, Any] = {"gateway": dict(GATEWAY)}
    data.setdefault(section, {})[key] = value
    found = _problems(data)
    assert any(p.startswith(f"smg.toml: {named}: ") and words in p for p in found), found


def test_cross_key_refusals() -> None:
    found = _problems(
        {
            "gateway": {**GATEWAY, "require_tls_from_clients": True},
            "delivery": {"retry_initial": "2h", "retry_max": "1h"},
        }
    )
    assert any(p.startswith("smg.toml: gateway.require_tls_from_clients: needs") for p in found)
    assert "smg.toml: delivery.retry_initial: must not be longer than retry_max" in found


def test_values_that_stay_allowed() -> None:
    config = parse_config(
        {
            "gateway": {
                **GATEWAY,
                "client_networks": ["2001:db8:1::/48", "10.0.0.0/8", "::1/128"],
                "metrics_listen": "[::1]:9925",
                "max_message_size": max_message_size(),
                "data_memory": max_message_size(),  # the budget holds one such message
            },
            "dns": {"negative_ttl_max": 0, "nameservers": ["[::1]:53", "127.0.0.1"]},
            "delivery": {"connection_reuse": 0},
            "tls_policy": {"failure_memory": "0s"},
            "spam": {"spam_score": -5},
            "routing": {"verdict_header": "X-Our-Verdict"},
            "dkim": {"headers": ["From", "Subject"]},
        }
    )
    assert config.gateway.max_message_size == spool_length_limit() - 2**20
    assert config.dkim.headers == ["from", "subject"]
    public = parse_config(
        {"gateway": {**GATEWAY, "metrics_listen": "0.0.0.0:9925", "metrics_public": True}}
    )
    assert public.gateway.metrics_listen == ("0.0.0.0", 9925)
    localhost = parse_config({"gateway": {**GATEWAY, "metrics_listen": "localhost:9925"}})
    assert localhost.gateway.metrics_listen == ("localhost", 9925)


def test_spool_limit_is_sqlites() -> None:
    """The bound is what the spool can really store: SQLite refuses a row whose record (all its
    columns together) is longer than the limit (shown with the limit lowered, to spare a
    gigabyte): hence the headroom for the other columns and the added headers."""
    assert spool_length_limit() == 1_000_000_000  # SQLITE_MAX_LENGTH of the Debian build
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE messages (data BLOB NOT NULL)")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1000)
    conn.execute("INSERT INTO messages VALUES (?)", (b"x" * 990,))
    with pytest.raises(sqlite3.Error, match="too big"):
        conn.execute("INSERT INTO messages VALUES (?)", (b"x" * 1000,))
    conn.close()


SHADOWING = """
[gateway]
hostname = "gw.example.net"
role = "bad"

[[tls_policy.rules]]
sender = "*"
recipient = "*"
level = "encrypt"

[[tls_policy.rules]]
sender = "example.net"
recipient = "partner.example"
level = "verify"
"""


def test_rule_shadowing_mta_sts_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "smg.toml"
    path.write_text(SHADOWING)
    assert smg(["config", "validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: OK (1 warning)"
    assert err.startswith(f"{path}: tls_policy.rules[0]: warning: recipient '*' ")
    assert "shadows MTA-STS" in err and "rules[1]" not in err
    config = load_config(path)
    with caplog.at_level(logging.WARNING, logger="smg"):
        _log_config_warnings(config)
    assert [r.getMessage() for r in caplog.records] == ["config_warning"]
    off = SHADOWING + "\n[mta_sts]\nenabled = false\n"
    assert config_warnings(parse_config(tomllib.loads(off))) == []


def test_every_documented_key_states_its_bound() -> None:
    text = DOCS.read_text()
    sections = re.split(r"^## `\[(\[?\w+\]?)\]`", text, flags=re.M)
    bounds: dict[str, str] = {}
    for name, body in zip(sections[1::2], sections[2::2], strict=True):
        assert "| key | default | bound | meaning |" in body, name
        if name.startswith("["):
            bounds[name[1:-1]] = "a list of tables"
        for key, bound in re.findall(r"^\| `([\w.\[\]]+)` \| [^|]*\| ([^|]*) \|", body, re.M):
            bounds[documented_key(name, key)] = bound.strip()
    missing = [key for key in _schema_keys(Config, "") if not bounds.get(key)]
    assert not missing, f"keys without a bound in docs/configuration.md: {missing}"
    assert "998951424" in bounds["gateway.max_message_size"]
