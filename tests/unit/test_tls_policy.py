"""gateway.tls: patterns, precedence, config errors, MTA-STS fallback, failure memory,
TLS contexts and the description of a TLS session (the far end is a local asyncio TLS server)."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.domains import pattern_matches, pattern_rank
from gateway.tls.failures import TlsFailureCache
from gateway.tls.mta_sts import MtaStsPolicy
from gateway.tls.policy import TlsPolicy, TlsRequirement
from gateway.tls.verify import describe_tls, verify_chain
from tests.harness import TestCA


def config(rules: list[dict[str, str]], **sections: Any) -> Any:
    data = {
        "gateway": {"hostname": "gw.example.net", "role": "bad"},
        "tls_policy": {"rules": rules, "ca_bundle": "/tmp/ca.pem"},
        "mta_sts": {"enabled": False},
        **sections,
    }
    return parse_config(data)


def rule(sender: str, recipient: str, level: str = "encrypt", on_failure: str = "hold") -> dict:
    return {"sender": sender, "recipient": recipient, "level": level, "on_failure": on_failure}


# --- patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "domain", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "mail.example.com", False),
        (".example.com", "mail.example.com", True),
        (".example.com", "a.b.example.com", True),
        (".example.com", "example.com", False),  # Postfix: ".domain" is subdomains only
        (".example.com", "badexample.com", False),
        ("*", "anything.org", True),
        ("*", "", True),  # the null sender
        ("example.com", "", False),
    ],
)
def test_pattern_matches(pattern: str, domain: str, expected: bool) -> None:
    assert pattern_matches(pattern, domain) is expected


def test_pattern_ranks() -> None:
    assert pattern_rank("a.example.com") > pattern_rank(".b.a.example.com")
    assert pattern_rank(".b.example.com") > pattern_rank(".example.com") > pattern_rank("*")


# --- precedence -----------------------------------------------------------------------------

RULES = [
    rule("*", "partner.net", "encrypt", "hold"),  # 0
    rule("bank.de", "partner.net", "verify", "reject"),  # 1
    rule(".bank.de", "*", "encrypt", "reject"),  # 2
    rule("*", ".partner.net", "verify", "hold"),  # 3
    rule("*", ".eu.partner.net", "encrypt", "reject"),  # 4
    rule("bank.de", "*", "verify", "hold"),  # 5
]


@pytest.mark.parametrize(
    ("sender", "recipient", "expected_index"),
    [
        ("bank.de", "partner.net", 1),  # exact/exact beats everything
        ("shop.org", "partner.net", 0),  # recipient exact beats sender exact (rule 5)
        ("bank.de", "mail.partner.net", 3),  # recipient subdomain beats recipient *
        ("x.bank.de", "a.eu.partner.net", 4),  # longer suffix wins
        ("x.bank.de", "elsewhere.org", 2),
        ("bank.de", "elsewhere.org", 5),
        ("BANK.DE", "Partner.NET.", 1),  # case and trailing dot do not matter
        ("shop.org", "elsewhere.org", None),
        ("", "partner.net", 0),  # the null sender matches only "*"
    ],
)
async def test_most_specific_rule_wins(sender: str, recipient: str, expected_index) -> None:
    policy = TlsPolicy(config(RULES), resolver=None)
    found = policy.rule_for(sender, recipient)
    assert (found.index if found else None) == expected_index
    req = await policy.requirement(sender, recipient)
    if expected_index is None:
        assert (req.level, req.on_failure, req.source) == ("opportunistic", None, "default")
    else:
        expected = RULES[expected_index]
        assert (req.level, req.on_failure) == (expected["level"], expected["on_failure"])
        assert req.source.startswith(f"tls_policy.rules[{expected_index}]")
        assert str(req.ca_bundle) == "/tmp/ca.pem" and req.requires_tls


# --- config errors --------------------------------------------------------------------------


def test_same_pair_twice_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config([rule("bank.de", ".partner.net"), rule("Bank.DE.", ".PARTNER.net", "verify")])
    text = str(caught.value)
    assert "tls_policy.rules[1]" in text and "tls_policy.rules[0]" in text


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        (rule("", "partner.net"), "rules[0].sender"),
        (rule("bank.de", "not a domain"), "rules[0].recipient"),
        (rule("localhost", "partner.net"), "rules[0].sender"),
        (rule("*.bank.de", "partner.net"), "rules[0].sender"),
        (rule("bank.de", "partner.net", level="opportunistic"), "rules[0].level"),
        (rule("bank.de", "partner.net", on_failure="bounce"), "rules[0].on_failure"),
    ],
)
def test_bad_rules_name_the_key(bad: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"tls_policy\.{re.escape(key)}"):
        config([bad])


def test_a_one_label_suffix_is_allowed() -> None:
    policy = TlsPolicy(config([rule("*", ".de")]), resolver=None)
    assert policy.rule_for("a.org", "x.de") is not None


# --- MTA-STS as the fallback ----------------------------------------------------------------


class FakeMtaSts:
    def __init__(self, policy: MtaStsPolicy | None) -> None:
        self._policy = policy
        self.asked: list[str] = []

    async def policy(self, domain: str) -> MtaStsPolicy | None:
        self.asked.append(domain)
        return self._policy


def sts_policy(mode: str) -> MtaStsPolicy:
    return MtaStsPolicy("partner.net", "id7", mode, ("mx1.partner.net", "*.mx.partner.net"), 3600)


async def test_mta_sts_enforce_requires_verify_to_listed_mx() -> None:
    sts = FakeMtaSts(sts_policy("enforce"))
    policy = TlsPolicy(config([], mta_sts={"enabled": True}), resolver=None, mta_sts=sts)
    req = await policy.requirement("shop.org", "Partner.NET")
    assert (req.level, req.on_failure, req.testing) == ("verify", "hold", False)
    assert req.source == "mta-sts enforce id=id7" and sts.asked == ["partner.net"]
    assert req.mx_allowed("a.mx.partner.net") and not req.mx_allowed("mx2.partner.net")


async def test_mta_sts_testing_delivers_and_only_reports() -> None:
    sts = FakeMtaSts(sts_policy("testing"))
    policy = TlsPolicy(config([], mta_sts={"enabled": True}), resolver=None, mta_sts=sts)
    req = await policy.requirement("shop.org", "partner.net")
    assert (req.level, req.on_failure, req.testing) == ("opportunistic", None, True)
    assert req.mx_allowed("mx2.partner.net") and not req.mx_listed("mx2.partner.net")


async def test_a_rule_beats_mta_sts_and_none_mode_or_disabled_is_opportunistic() -> None:
    sts = FakeMtaSts(sts_policy("enforce"))
    cfg = config([rule("*", "partner.net", "encrypt", "reject")], mta_sts={"enabled": True})
    req = await TlsPolicy(cfg, resolver=None, mta_sts=sts).requirement("a.org", "partner.net")
    assert (req.level, req.on_failure) == ("encrypt", "reject") and sts.asked == []
    none = TlsPolicy(config([], mta_sts={"enabled": True}), None, FakeMtaSts(sts_policy("none")))
    assert (await none.requirement("a.org", "partner.net")).level == "opportunistic"
    off = TlsPolicy(config([]), None, FakeMtaSts(sts_policy("enforce")))
    assert (await off.requirement("a.org", "partner.net")).level == "opportunistic"


# --- the failure memory ---------------------------------------------------------------------


def test_failure_cache_expires_and_is_cleared_by_success() -> None:
    now = [100.0]
    cache = TlsFailureCache(ttl=60, max_entries=2, clock=lambda: now[0])
    cache.record_failure("Partner.NET.", "no STARTTLS at mx1.partner.net", "encrypt")
    assert cache.recent_failure("partner.net") == "no STARTTLS at mx1.partner.net"
    now[0] += 61
    assert cache.recent_failure("partner.net") is None
    cache.record_failure("partner.net")
    cache.record_success("partner.net")
    assert cache.recent_failure("partner.net") is None
    for name in ("a.net", "b.net", "c.net"):
        cache.record_failure(name)
    assert cache.recent_failure("a.net") is None and cache.recent_failure("c.net")


def test_failure_levels() -> None:
    cache = TlsFailureCache(ttl=60)
    cache.record_failure("partner.net", "certificate has expired", "verify")
    assert cache.recent_failure("partner.net", "verify") == "certificate has expired"
    assert cache.recent_failure("partner.net", "encrypt") is None  # encrypt may still work
    cache.record_success("partner.net", "encrypt")  # says nothing about verify
    assert cache.recent_failure("partner.net", "verify") == "certificate has expired"
    cache.record_failure("other.net", "STARTTLS not offered", "encrypt")
    assert cache.recent_failure("other.net", "verify") == "STARTTLS not offered"
    cache.record_success("other.net", "verify")
    assert cache.recent_failure("other.net", "encrypt") is None


def test_policy_failure_memory_uses_the_config_ttl() -> None:
    cfg = config([], tls_policy={"rules": [], "failure_memory": "2m"})
    assert TlsPolicy(cfg, resolver=None).failures.ttl == 120


# --- TLS contexts and session description ---------------------------------------------------


def test_contexts_per_level(tmp_path) -> None:
    ca = TestCA(tmp_path)
    verify = TlsRequirement("verify", "hold", "t", (), ca.ca_bundle).ssl_context()
    assert verify.verify_mode == ssl.CERT_REQUIRED and verify.check_hostname
    assert verify.minimum_version == ssl.TLSVersion.TLSv1_2
    encrypt = TlsRequirement("encrypt", "hold", "t").ssl_context()
    assert encrypt.verify_mode == ssl.CERT_NONE and not encrypt.check_hostname
    assert encrypt.minimum_version == ssl.TLSVersion.TLSv1_2
    assert TlsRequirement().ssl_context().verify_mode == ssl.CERT_NONE


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


async def tls_server(context: ssl.SSLContext) -> tuple[asyncio.AbstractServer, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


async def handshake(context: ssl.SSLContext, port: int, host: str) -> Any:
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=host
    )
    ssl_object = writer.get_extra_info("ssl_object")
    return ssl_object, writer


@pytest.fixture
async def leaves(ca: TestCA) -> AsyncIterator[dict[str, int]]:
    host = "mx1.partner.net"
    servers = {}
    for kind, leaf in (
        ("valid", ca.valid(host)),
        ("wrong-name", ca.wrong_name(host)),
        ("expired", ca.expired(host)),
    ):
        servers[kind] = await tls_server(leaf.server_context())
    yield {kind: port for kind, (_, port) in servers.items()}
    for server, _ in servers.values():
        server.close()


@pytest.mark.parametrize(
    ("kind", "verification", "detail"),
    [
        ("valid", "trusted", ""),
        ("wrong-name", "untrusted", "name does not match"),
        ("expired", "untrusted", "expired"),
    ],
)
async def test_describe_opportunistic_session(ca, leaves, kind, verification, detail) -> None:
    req = TlsRequirement("encrypt", "hold", "t", (), ca.ca_bundle)
    ssl_object, writer = await handshake(req.ssl_context(), leaves[kind], "mx1.partner.net")
    outcome = describe_tls(ssl_object, "mx1.partner.net", req)
    writer.close()
    assert outcome.version in ("TLSv1.2", "TLSv1.3") and outcome.cipher
    assert outcome.verification == verification and detail in outcome.detail
    assert outcome.log_fields().startswith(f"tls={outcome.version} cipher=")


async def test_verify_level_refuses_bad_certificates_in_the_handshake(ca, leaves) -> None:
    req = TlsRequirement("verify", "hold", "t", (), ca.ca_bundle)
    ssl_object, writer = await handshake(req.ssl_context(), leaves["valid"], "mx1.partner.net")
    assert describe_tls(ssl_object, "mx1.partner.net", req).verification == "verified"
    writer.close()
    for kind in ("wrong-name", "expired"):
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(req.ssl_context(), leaves[kind], "mx1.partner.net")


def test_verify_chain_against_another_ca(ca, tmp_path) -> None:
    other = TestCA(tmp_path)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = x509.load_pem_x509_certificates(other.valid("mx.a.net").cert_path.read_bytes())[0]
    der = [leaf.public_bytes(Encoding.DER)]
    assert verify_chain(der, "mx.a.net", ca.ca_bundle) == "chain not trusted by the CA bundle"
    assert verify_chain(der, "mx.a.net", other.ca_bundle) is None
    assert describe_tls(None, "mx.a.net", TlsRequirement()).log_fields() == "tls=none"


async def test_a_reload_keeps_failures_and_mta_sts_policies() -> None:
    from gateway.tls.mta_sts import MtaSts

    before_config = config([], mta_sts={"enabled": True})
    before = TlsPolicy(before_config, resolver=object())
    before.failures.record_failure("partner.net", "STARTTLS not offered", "encrypt")
    assert isinstance(before.mta_sts, MtaSts)
    before.mta_sts._remember(before.mta_sts._cache, "partner.net", sts_policy("enforce"))
    after_config = config([], mta_sts={"enabled": True}, tls_policy={"failure_memory": "1h"})
    after = TlsPolicy(after_config, resolver=object())
    after.carry_over(before)
    assert after.failures.recent_failure("partner.net") == "STARTTLS not offered"
    assert after.failures.ttl == 3600
    assert after.mta_sts is not None and after.mta_sts.cached("partner.net") is not None


def test_failure_memory_is_shared_through_the_state_file(tmp_path) -> None:
    from gateway.tls.mta_sts import StateFile

    path = tmp_path / "tls-failures.json"
    delivering = TlsFailureCache(ttl=60, state=StateFile(path))  # one worker delivers...
    receiving = TlsFailureCache(ttl=60, state=StateFile(path))  # ...another takes the session
    assert receiving.recent_failure("partner.net") is None
    delivering.record_failure("partner.net", "STARTTLS not offered", "encrypt")
    delivering.record_failure("other.net", "certificate has expired", "verify")
    assert receiving.recent_failure("partner.net") == "STARTTLS not offered"
    receiving.record_success("partner.net", "encrypt")
    assert delivering.recent_failure("partner.net") is None
    assert delivering.recent_failure("other.net") == "certificate has expired"
    restarted = TlsFailureCache(ttl=60, state=StateFile(path))  # survives a restart
    assert restarted.recent_failure("other.net") == "certificate has expired"


def test_a_damaged_or_unwritable_state_file_leaves_memory_only(tmp_path, caplog) -> None:
    from gateway.tls.mta_sts import StateFile

    damaged = tmp_path / "tls-failures.json"
    damaged.write_text("{not json")
    cache = TlsFailureCache(ttl=60, state=StateFile(damaged))
    assert cache.recent_failure("partner.net") is None
    cache.record_failure("partner.net", "x", "encrypt")  # the file is rewritten whole
    assert cache.recent_failure("partner.net") == "x"
    nowhere = TlsFailureCache(ttl=60, state=StateFile(tmp_path / "missing" / "f.json"))
    nowhere.record_failure("partner.net", "y", "encrypt")
    assert nowhere.recent_failure("partner.net") == "y"
    assert "kept in this process's memory only" in caplog.text


def test_policy_uses_the_spool_directory_for_shared_state(tmp_path) -> None:
    cfg = config([], mta_sts={"enabled": True})
    first = TlsPolicy(cfg, resolver=object(), state_dir=tmp_path)
    first.failures.record_failure("partner.net", "no STARTTLS", "encrypt")
    second = TlsPolicy(cfg, resolver=object(), state_dir=tmp_path)
    assert second.failures.recent_failure("partner.net") == "no STARTTLS"
    assert (tmp_path / "tls-failures.json").exists()
    assert second.mta_sts is not None and second.mta_sts.state is not None


async def test_encrypt_and_verify_refuse_tls_below_1_2(ca) -> None:
    """The far end speaks only TLS 1.0/1.1: a required level refuses it in the handshake."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose
        old = ca.valid("mx1.partner.net").server_context()
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
    server, port = await tls_server(old)
    try:
        for level in ("encrypt", "verify"):
            req = TlsRequirement(level, "hold", "t", (), ca.ca_bundle)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(req.ssl_context(), port, "mx1.partner.net")
    finally:
        server.close()
