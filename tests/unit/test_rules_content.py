"""Virus, spam, verdict and route rules with fake scanners (decisions and replies).

The real clamd and rspamd are used in tests/integration/test_virus.py and test_spam.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import Config, parse_config
from gateway.policy.chain import Action, Chain, MessageContext, Stage
from gateway.policy.rules.route import RouteRule
from gateway.policy.rules.spam import SpamRule, SpamVerdict, classify
from gateway.policy.rules.verdict import VerdictRule, format_verdict, parse_verdict
from gateway.policy.rules.virus import VirusRule
from gateway.scanners.clamd import ClamdSizeLimit, ClamdTimeout, ClamdUnavailable, ScanResult
from gateway.scanners.rspamd import RspamdError

GOOD_IP = "127.0.0.21"
MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


def config(role: str = "good", **spam: Any) -> Config:
    return parse_config(
        {
            "gateway": {"hostname": f"{role}.example.net", "role": role},
            "routing": {"bad_gateways": ["127.0.0.31:25"], "good_gateways": [GOOD_IP]},
            "spam": spam,
        }
    )


class FakeClamd:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    async def scan(self, data: bytes) -> ScanResult:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return ScanResult(self.outcome, "stream: ...")


class FakeRspamd:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.calls: list[dict[str, Any]] = []

    async def check(self, data: bytes, **kw: Any) -> dict[str, Any]:
        self.calls.append(kw)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def ctx(data: bytes = MESSAGE, client_ip: str = "127.0.0.5") -> MessageContext:
    return MessageContext(
        client_ip=client_ip,
        helo="client.example.com",
        mail_from="a@example.com",
        rcpt_tos=["b@example.net"],
        data=data,
    )


# -- virus --------------------------------------------------------------------------------------


async def test_virus_found_rejects_with_name_and_records_fact() -> None:
    c = ctx()
    result = await VirusRule(FakeClamd("Win.Test.EICAR_HDB-1")).evaluate(c)
    assert result.action == Action.REJECT
    assert str(result.reply) == "554 5.7.1 Virus found: Win.Test.EICAR_HDB-1"
    assert c.facts["virus"] == "Win.Test.EICAR_HDB-1"


async def test_virus_clean_decides_nothing() -> None:
    result = await VirusRule(FakeClamd(None)).evaluate(ctx())
    assert result.action is None and result.summary == "clean"


@pytest.mark.parametrize(
    "error",
    [ClamdUnavailable("down"), ClamdTimeout("slow"), ClamdSizeLimit("too big")],
    ids=["down", "timeout", "size-limit"],
)
async def test_virus_no_verdict_is_a_tempfail_never_an_accept(error: Exception) -> None:
    result = await VirusRule(FakeClamd(error)).evaluate(ctx())
    assert result.action == Action.TEMPFAIL
    assert result.reply is not None and (result.reply.code, result.reply.status) == (451, "4.7.0")


# -- spam ---------------------------------------------------------------------------------------

GTUBE_REPLY = {
    "action": "reject",
    "score": 15.2,
    "required_score": 15.0,
    "symbols": {
        "GTUBE": {"name": "GTUBE", "score": 15.0},
        "MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1},
        "ARC_NA": {"name": "ARC_NA", "score": 0.0},
        "MISSING_DATE": {"name": "MISSING_DATE", "score": 1.0},
    },
}


async def test_spam_records_verdict_and_passes_session_facts() -> None:
    rspamd = FakeRspamd(GTUBE_REPLY)
    c = ctx()
    result = await SpamRule(rspamd, config().spam).evaluate(c)  # type: ignore[arg-type]
    assert result.action is None, "spam is never rejected: the route rule reroutes it"
    verdict = c.facts["spam"]
    assert verdict["is_spam"] and verdict["score"] == 15.2 and verdict["action"] == "reject"
    assert list(verdict["symbols"]) == ["GTUBE", "MISSING_DATE", "MIME_GOOD"]
    assert rspamd.calls[0]["ip"] == "127.0.0.5"
    assert rspamd.calls[0]["helo"] == "client.example.com"
    assert rspamd.calls[0]["rcpts"] == ["b@example.net"]
    assert rspamd.calls[0]["user"], "User marks the message as outbound"


@pytest.mark.parametrize(
    ("action", "score", "is_spam"),
    [
        ("no action", 0.5, False),
        ("no action", 6.0, True),  # spam_score reached
        ("add header", 4.0, True),  # action listed in spam_actions
        ("greylist", 4.5, False),
        ("soft reject", 2.0, False),
        ("reject", 1.0, True),
    ],
)
def test_classify_by_actions_and_score(action: str, score: float, is_spam: bool) -> None:
    verdict = classify({"action": action, "score": score, "symbols": {}}, config().spam)
    assert verdict["is_spam"] is is_spam
    assert verdict["required"] == 6.0


async def test_spam_rspamd_down_tempfails_unless_fail_open() -> None:
    result = await SpamRule(FakeRspamd(RspamdError("down")), config().spam).evaluate(ctx())  # type: ignore[arg-type]
    assert result.action == Action.TEMPFAIL and str(result.reply).startswith("451 4.7.0")
    c = ctx()
    section = config(fail_open=True).spam
    result = await SpamRule(FakeRspamd(RspamdError("down")), section).evaluate(c)  # type: ignore[arg-type]
    assert result.action is None and "spam" not in c.facts


# -- verdict header -----------------------------------------------------------------------------


def verdict(is_spam: bool = True) -> SpamVerdict:
    return SpamVerdict(
        is_spam=is_spam,
        score=15.2,
        required=6.0,
        action="reject",
        symbols={"GTUBE": 15.0, "MISSING_DATE": 1.0, "MIME_GOOD": -0.1},
        source="rspamd",
    )


def test_verdict_header_round_trip() -> None:
    value = format_verdict(verdict(), "mta01.example.net")
    assert value.startswith("spam; score=15.2; required=6; action=reject; by=mta01.example.net")
    parsed, by = parse_verdict(value)  # type: ignore[misc]
    assert by == "mta01.example.net"
    assert parsed["symbols"] == verdict()["symbols"] and parsed["is_spam"]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "maybe; score=1; required=6; action=reject; by=x; symbols=",
        "spam; score=abc; required=6; action=reject; by=x; symbols=",
        "spam; score=1; required=6; action=reject; by=x",
        "spam; score=1; required=6; action=reject; by=x; symbols=A:1; score=2",
        "spam; score=1; required=6; action=reject; by=x; symbols=A 1",
        "spam; score=1; required=6; action=<script>; by=x; symbols=",
    ],
)
def test_malformed_verdict_headers_are_rejected(value: str) -> None:
    assert parse_verdict(value) is None


def with_header(value: str, name: str = "X-SMG-Verdict") -> bytes:
    return f"{name}: {value}\r\n".encode() + MESSAGE


async def test_bad_gateway_trusts_header_only_from_good_gateways() -> None:
    rule = VerdictRule(config("bad").routing, "bad")
    data = with_header(format_verdict(verdict(), "mta01.example.net"))
    trusted = ctx(data, client_ip=GOOD_IP)
    result = await rule.evaluate(trusted)
    assert result.details["trusted"] is True
    assert trusted.facts["spam"]["score"] == 15.2
    assert trusted.facts["spam"]["source"].startswith("verdict header from mta01.example.net")
    assert "x-smg-verdict" in trusted.remove_headers, "never passes on, even when trusted"

    stranger = ctx(data, client_ip="127.0.0.66")
    result = await rule.evaluate(stranger)
    assert result.details["trusted"] is False
    assert "spam" not in stranger.facts and "x-smg-verdict" in stranger.remove_headers


async def test_ipv4_mapped_peer_address_is_recognised() -> None:
    rule = VerdictRule(config("bad").routing, "bad")
    assert rule.trusts(f"::ffff:{GOOD_IP}") and not rule.trusts("::1")


async def test_good_gateway_never_trusts_a_verdict_header() -> None:
    rule = VerdictRule(config("good").routing, "good")
    forged = ctx(with_header(format_verdict(verdict(False), "x.example"), "x-smg-verdict"), GOOD_IP)
    result = await rule.evaluate(forged)
    assert result.details["trusted"] is False and "spam" not in forged.facts
    assert "x-smg-verdict" in forged.remove_headers


async def test_repeated_or_malformed_header_from_good_gateway_is_ignored() -> None:
    rule = VerdictRule(config("bad").routing, "bad")
    good = format_verdict(verdict(), "mta01.example.net")
    twice = f"X-SMG-Verdict: {good}\r\n".encode() + with_header(good)
    for data in (twice, with_header("garbage")):
        c = ctx(data, GOOD_IP)
        result = await rule.evaluate(c)
        assert result.details["trusted"] is False and "spam" not in c.facts


# -- route and the whole DATA stage -----------------------------------------------------------


async def test_route_good_gateway() -> None:
    rule = RouteRule("good")
    spam, ham = ctx(), ctx()
    spam.facts["spam"] = verdict(True)
    ham.facts["spam"] = verdict(False)
    assert (await rule.evaluate(spam)).action == Action.REROUTE
    assert (await rule.evaluate(ham)).action == Action.ACCEPT
    assert (await rule.evaluate(ctx())).action == Action.ACCEPT


async def test_route_bad_gateway_delivers_everything_itself() -> None:
    c = ctx()
    c.facts["spam"] = verdict(True)
    assert (await RouteRule("bad").evaluate(c)).action == Action.ACCEPT


async def test_forged_header_cannot_make_spam_look_like_ham_on_a_good_gateway() -> None:
    cfg = config("good")
    chain = Chain(
        [
            VirusRule(FakeClamd(None)),  # type: ignore[arg-type]
            VerdictRule(cfg.routing, "good"),
            SpamRule(FakeRspamd(GTUBE_REPLY), cfg.spam),  # type: ignore[arg-type]
            RouteRule("good"),
        ]
    )
    forged = ctx(with_header(format_verdict(verdict(False), "mta01.example.net")), GOOD_IP)
    decision = await chain.run(Stage.DATA, forged)
    assert decision.action == Action.REROUTE
    assert [r.rule for r in decision.results] == ["virus", "verdict", "spam", "route"]


async def test_virus_decides_before_spam_is_asked() -> None:
    rspamd = FakeRspamd(GTUBE_REPLY)
    cfg = config("good")
    chain = Chain(
        [
            VirusRule(FakeClamd("Eicar")),  # type: ignore[arg-type]
            SpamRule(rspamd, cfg.spam),  # type: ignore[arg-type]
            RouteRule("good"),
        ]
    )
    decision = await chain.run(Stage.DATA, ctx())
    assert decision.action == Action.REJECT and rspamd.calls == []


def test_pre_result_symbols_with_zero_score_are_kept() -> None:
    reply = {
        "is_skipped": True,
        "action": "reject",
        "score": 15.0,
        "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0}},
    }
    assert classify(reply, config().spam)["symbols"] == {"GTUBE": 0.0}
