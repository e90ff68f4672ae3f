"""The CLI's printers escape control characters (issue 12, point 5): what a client wrote into
the spool (a sender, a HELO name, a header) or a far end replied cannot drive the operator's
terminal or forge output lines.  JSON output escapes them by itself (ensure_ascii)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.cli.explain import Explanation, Step, render
from gateway.queue.spool import Spool

# A terminal title escape, a colour, a bidi override, a forged line and a C1 control.
EVIL = "x\x1b]0;pwned\x07y\x1b[31m\u202ez\r\nforged: line\x85"
ON_A_LINE = EVIL.replace("\r\n", " ")  # in a message, CRLF is a line end: the rest as it is


def _assert_safe(text: str) -> None:
    assert all(c.isprintable() or c in "\n\t" for c in text), repr(text)
    assert "\nforged: line" not in text


async def _spool_with_hostile_message(tmp_path: Path) -> tuple[Path, str]:
    spool = await Spool.open(tmp_path / "spool")
    try:
        queue_id = await spool.enqueue(
            f"a{EVIL}@example.net",
            [f"b{EVIL}@example.net"],
            f"Subject: {ON_A_LINE}\r\n\tfolded\r\n\r\nbody {ON_A_LINE}\r\n".encode(),
            client_ip="127.0.0.1",
            helo=f"helo{EVIL}",
        )
    finally:
        await spool.close()
    config = tmp_path / "smg.toml"
    config.write_text(
        f'[gateway]\nhostname = "gw.example.net"\nrole = "bad"\nspool = "{tmp_path / "spool"}"\n'
    )
    return config, queue_id


@pytest.mark.parametrize("command", [["list"], ["show"], ["show", "--body"]])
async def test_queue_printers_escape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    config, queue_id = await _spool_with_hostile_message(tmp_path)
    ident = [queue_id] if command[0] == "show" else []
    assert main(["queue", command[0], *ident, *command[1:], "--config", str(config)]) == 0
    out = capsys.readouterr().out
    _assert_safe(out)
    assert "x\\x1b]0;pwned\\x07y\\x1b[31m\\u202ez\\r\\nforged: line\\x85" in out
    if command[0] == "show":
        assert "Subject: x\\x1b]0;pwned\\x07y\\x1b[31m\\u202ez forged: line\\x85" in out
        assert "\tfolded" in out  # a folded header keeps its tab


def test_explain_render_escapes() -> None:
    explanation = Explanation("gw.example.net", "good", f"a{EVIL}@example.net", "127.0.0.1")
    explanation.steps.append(Step("data", "spam", "reject", f"subject {EVIL}", f"550 {EVIL}"))
    explanation.outcome, explanation.reply = "rejected", f"550 {EVIL}"
    explanation.notes.append(EVIL)
    _assert_safe(render(explanation))


def test_tls_probe_text_escapes_the_far_end(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A far end's banner reaches the operator's terminal through ``smg tls probe``."""
    from gateway.cli import tls

    async def probe(*args: object) -> tls.DomainProbe:
        requirement = {"level": "opportunistic", "on_failure": None, "source": "default",
                       "mx_patterns": []}  # fmt: skip
        host = tls.HostProbe("mx.example.net", 10, "192.0.2.1", 25, banner=f"220 {EVIL}")
        return tls.DomainProbe("example.net", "", requirement, hosts=[host])

    monkeypatch.setattr(tls, "probe_domain", probe)
    main(["tls", "probe", "example.net"])
    out = capsys.readouterr().out
    _assert_safe(out)


def test_blacklist_reason_from_txt_is_escaped() -> None:
    """A DNSBL's TXT record (the listing reason) is printed by ``smg blacklist check``."""
    from gateway.blacklist.answers import LISTED
    from gateway.blacklist.lookup import Result
    from gateway.blacklist.report import _reason

    result = Result("192.0.2.1", "dnsbl.example", "Example", False, LISTED, ("127.0.0.2",),
                    "listed", reason=EVIL)  # fmt: skip
    _assert_safe(_reason(result))
