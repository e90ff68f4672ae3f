"""The cleanup step and the header tools: what is queued after the chain decided."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim as dkimpy
import dns.rdata
import pytest

from gateway.config import Config, parse_config
from gateway.dkim import DkimKeyError, load_private_key, write_new_key
from gateway.dns import NODATA, OK, DnsResult, MailHost, MailHosts
from gateway.policy import headers
from gateway.policy.chain import Action, Decision, MessageContext
from gateway.policy.cleanup import Cleanup
from gateway.policy.rules.spam import SpamVerdict
from gateway.policy.rules.verdict import parse_verdict
from gateway.scanners.clamd import ScanResult
from gateway.services import build_services

EICAR_LIKE = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$ not really"
MESSAGE = (
    b"X-SMG-Verdict: ham; score=0; required=6; action=no action; by=forged; symbols=\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: report\r\n"
    b"x-smg-verdict: spam; score=1;\r\n folded=yes\r\n"
    b"Message-ID: <r-1@example.com>\r\n"
    b"\r\n"
    b"body with X-SMG-Verdict: in it stays\r\n"
)


# -- header tools -------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_remove_and_prepend_keep_every_other_byte(eol: bytes) -> None:
    data = MESSAGE.replace(b"\r\n", eol)
    removed = headers.remove(data, {"X-SMG-Verdict"})
    assert b"smg-verdict: " not in removed.lower().split(eol + eol)[0]
    assert removed.endswith(b"body with X-SMG-Verdict: in it stays" + eol)
    assert removed == data.replace(data.split(b"From:")[0], b"").replace(
        b"x-smg-verdict: spam; score=1;" + eol + b" folded=yes" + eol, b""
    )
    added = headers.prepend(removed, [("X-Test", "a " * 60)])
    assert added.endswith(removed)
    first = added.split(b"From:")[0]
    assert all(len(line) <= 78 for line in first.split(eol)), "folded"
    assert first.count(eol) == 2 and eol + b" a" in first
    assert headers.get_values(added, "x-test") == [" ".join(["a"] * 60)]


def test_get_values_unfolds_and_ignores_body() -> None:
    assert headers.get_values(MESSAGE, "X-SMG-Verdict") == [
        "ham; score=0; required=6; action=no action; by=forged; symbols=",
        "spam; score=1; folded=yes",
    ]
    assert headers.get_values(b"Subject: x\r\n\r\nFrom: body\r\n", "from") == []


def test_prepend_cannot_inject_fields() -> None:
    added = headers.prepend(b"Subject: x\r\n\r\n", [("X-A", "one\r\nBcc: evil@example.org")])
    assert headers.get_values(added, "bcc") == []


# -- the cleanup step ---------------------------------------------------------------------------


class FakeSpool:
    def __init__(self, fail: bool = False) -> None:
        self.queued: list[tuple[str, list[str], bytes, dict[str, Any]]] = []
        self.fail = fail

    async def enqueue(self, mail_from: str, rcpts: list[str], data: bytes, **kw: Any) -> str:
        if self.fail:
            raise OSError("disk full")
        self.queued.append((mail_from, list(rcpts), data, kw))
        return "Q123"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    directory = tmp_path_factory.mktemp("keys")
    result = []
    for selector, algorithm in (("r1", "rsa"), ("e1", "ed25519")):
        path, _ = write_new_key(directory, "example.com", selector, algorithm)
        result.append({"domain": "example.com", "selector": selector, "key": str(path)})
    return result


def config(role: str, keys: list[dict[str, str]]) -> Config:
    return parse_config(
        {
            "gateway": {"hostname": f"{role}01.example.net", "role": role},
            "routing": {"bad_gateways": ["127.0.0.31"], "good_gateways": ["127.0.0.21"]},
            "dkim": {"keys": keys},
        }
    )


def dnsfunc(keys: list[dict[str, str]]):
    from gateway.dkim import dns_record_value

    records = {
        f"{k['selector']}._domainkey.{k['domain']}.".encode(): dns_record_value(
            load_private_key(Path(k["key"]))
        ).encode()
        for k in keys
    }
    return lambda name, timeout=5: records.get(name, b"")


def spam_ctx() -> MessageContext:
    ctx = MessageContext(
        client_ip="127.0.0.5", mail_from="alice@example.com", rcpt_tos=["bob@example.net"]
    )
    ctx.data = MESSAGE
    ctx.remove_headers.add("x-smg-verdict")
    ctx.facts["spam"] = SpamVerdict(
        is_spam=True,
        score=15.2,
        required=6.0,
        action="reject",
        symbols={"GTUBE": 15.0},
        source="rspamd",
    )
    return ctx


def decision(action: Action) -> Decision:
    return Decision(action, None, [])


async def test_good_gateway_reroute_adds_own_verdict_and_signs(keys) -> None:
    cleanup = Cleanup(build_services(config("good", keys)))
    out = await cleanup.prepare(spam_ctx(), decision(Action.REROUTE))
    values = headers.get_values(out, "X-SMG-Verdict")
    assert len(values) == 1, "the forged copies are gone, ours is there"
    verdict, by = parse_verdict(values[0])  # type: ignore[misc]
    assert by == "good01.example.net" and verdict["score"] == 15.2
    assert out.count(b"DKIM-Signature:") == 2
    verifier = dkimpy.DKIM(out)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc(keys))
    assert verifier.verify(idx=1, dnsfunc=dnsfunc(keys))
    # The bad gateway removes the verdict header: the signatures still verify.
    stripped = headers.remove(out, {"x-smg-verdict"})
    assert dkimpy.DKIM(stripped).verify(idx=0, dnsfunc=dnsfunc(keys))
    assert cleanup.signing_keys(spam_ctx())[0].startswith("d=example.com s=r1 (rsa-2048")


async def test_good_gateway_accept_has_no_verdict_header(keys) -> None:
    cleanup = Cleanup(build_services(config("good", keys)))
    out = await cleanup.prepare(spam_ctx(), decision(Action.ACCEPT))
    assert headers.get_values(out, "X-SMG-Verdict") == []
    assert out.count(b"DKIM-Signature:") == 2


async def test_bad_gateway_strips_verdict_and_never_signs(keys) -> None:
    cleanup = Cleanup(build_services(config("bad", keys)))
    ctx = spam_ctx()
    out = await cleanup.prepare(ctx, decision(Action.ACCEPT))
    assert b"dkim-signature" not in out.lower()
    assert headers.get_values(out, "X-SMG-Verdict") == []
    assert out.endswith(b"body with X-SMG-Verdict: in it stays\r\n")
    assert cleanup.signing_keys(ctx) == []


async def test_verdict_header_goes_even_if_no_rule_asked(keys) -> None:
    cleanup = Cleanup(build_services(config("bad", keys)))
    ctx = spam_ctx()
    ctx.remove_headers.clear()
    out = await cleanup.prepare(ctx, decision(Action.ACCEPT))
    assert headers.get_values(out, "X-SMG-Verdict") == []


def test_loose_key_mode_stops_the_pipeline_from_starting(tmp_path: Path) -> None:
    path, _ = write_new_key(tmp_path, "example.com", "s1", "rsa")
    path.chmod(0o644)
    cfg = config("good", [{"domain": "example.com", "selector": "s1", "key": str(path)}])
    with pytest.raises(DkimKeyError, match=r"s1\.key"):
        build_services(cfg)
    build_services(config("bad", []))  # the bad gateway loads no keys


class SenderDns:
    """The sender domain's MX host resolves to the client (the notice rule, issue 12)."""

    async def mail_hosts(self, domain: str) -> MailHosts:
        return MailHosts(domain, OK, [MailHost(10, f"mx.{domain}")])

    async def addresses(self, host: str) -> DnsResult:
        found = [dns.rdata.from_text("IN", "A", "127.0.0.5")] if host.startswith("mx.") else []
        return DnsResult(host, "A+AAAA", OK if found else NODATA, found)


class CleanClamd:
    """clamd finds the header block clean (the notice may quote it)."""

    async def scan(self, data: bytes) -> ScanResult:
        return ScanResult(None, "stream: OK")


def notice_cleanup(keys: list[dict[str, str]], spool: FakeSpool) -> Cleanup:
    services = build_services(config("good", keys), spool=spool)
    services.resolver, services.clamd = SenderDns(), CleanClamd()  # type: ignore[assignment]
    return Cleanup(services)


def virus_ctx(mail_from: str = "alice@example.com") -> MessageContext:
    ctx = MessageContext(
        client_ip="127.0.0.5",
        mail_from=mail_from,
        rcpt_tos=["bob@example.net", "carol@example.org"],
        data=b"From: alice@example.com\r\nSubject: invoice 42\r\nMessage-ID: <inv-42@example.com>"
        b"\r\n\r\n" + EICAR_LIKE + b"\r\n",
    )
    ctx.facts["virus"] = "SMG-Test.EICAR.UNOFFICIAL"
    return ctx


async def test_virus_reject_queues_info_ndr_without_the_content(keys) -> None:
    spool = FakeSpool()
    cleanup = notice_cleanup(keys, spool)
    await cleanup.after_reject(virus_ctx(), decision(Action.REJECT))
    ((sender, rcpts, data, kw),) = spool.queued
    assert sender == "" and rcpts == ["alice@example.com"] and kw["kind"] == "ndr"
    text = data.decode()
    for expected in ("SMG-Test.EICAR.UNOFFICIAL", "invoice 42", "<inv-42@example.com>",
                     "bob@example.net", "carol@example.org"):  # fmt: skip
        assert expected in text
    assert b"X5O!P%@AP" not in data and b"WDVPIVAlQEFQ" not in data


async def test_no_info_ndr_for_null_sender_or_other_rejections(keys) -> None:
    spool = FakeSpool()
    cleanup = notice_cleanup(keys, spool)
    await cleanup.after_reject(virus_ctx(""), decision(Action.REJECT))
    await cleanup.after_reject(virus_ctx(), decision(Action.TEMPFAIL))
    plain = virus_ctx()
    plain.facts.clear()
    await cleanup.after_reject(plain, decision(Action.REJECT))
    assert spool.queued == []


async def test_spool_failure_for_the_info_ndr_does_not_raise(keys) -> None:
    cleanup = notice_cleanup(keys, FakeSpool(fail=True))
    await cleanup.after_reject(virus_ctx(), decision(Action.REJECT))
