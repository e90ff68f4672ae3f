"""Bad input that must not stick (issue 12, point 5): an EHLO that is not valid UTF-8, NUL
bytes in DATA, control characters in logs and in the CLI's output."""

from __future__ import annotations

from pathlib import Path

from tests.unit.real_spool_relay import real_spool_relay
from tests.unit.test_intake import MESSAGE, Client


async def _mail(client: Client, body: bytes) -> str:
    assert (await client.cmd("MAIL FROM:<a@example.net>")).startswith("250")
    assert (await client.cmd("RCPT TO:<b@example.net>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    return await client.cmd(body + b".")


async def test_invalid_utf8_ehlo_is_501_and_the_session_goes_on(tmp_path: Path) -> None:
    async with real_spool_relay(tmp_path / "spool") as relay:
        for verb in (b"EHLO", b"HELO"):
            client, _ = await Client.connect(relay.port)
            reply = await client.cmd(verb + b" bad\xff\xfename.example")
            assert reply.startswith("501 5.5.2"), reply
            assert (await client.cmd("MAIL FROM:<a@example.net>")).startswith("503")
            assert (await client.cmd(verb + b" good.example.net")).startswith("250")
            assert (await _mail(client, MESSAGE)).startswith("250 2.0.0")
            client.close()
        assert await relay.stored() == 2


async def test_control_characters_in_ehlo_are_501(tmp_path: Path) -> None:
    async with real_spool_relay(tmp_path / "spool") as relay:
        client, _ = await Client.connect(relay.port)
        for name in (b"a\x00b.example", b"a\x1b[31mb.example", b"a\x7fb"):
            assert (await client.cmd(b"EHLO " + name)).startswith("501 5.5.2")
        assert (await client.cmd("EHLO b\u00fccher.example".encode())).startswith("250")
        assert (await _mail(client, MESSAGE)).startswith("250 2.0.0")


async def test_nul_in_data_is_554_and_not_queued(tmp_path: Path) -> None:
    async with real_spool_relay(tmp_path / "spool") as relay:
        client, _ = await Client.connect(relay.port)
        assert (await client.cmd("EHLO c.example.net")).startswith("250")
        reply = await _mail(client, b"Subject: nul\r\n\r\nbefore\x00after\r\n")
        assert reply.startswith("554 5.6.0"), reply
        assert relay.metrics.value("rejected", stage="data", reason="nul") == 1
        assert await relay.stored() == 0
        assert (await _mail(client, MESSAGE)).startswith("250 2.0.0")  # the session goes on
        assert await relay.stored() == 1


async def test_replies_echoing_bad_bytes_are_escaped(tmp_path: Path) -> None:
    """Found by the fuzz test: a reply quoting a parameter that is not UTF-8 could not be
    encoded (451 4.3.0 and a traceback in the log); a CR in an unknown command split the
    reply line."""
    async with real_spool_relay(tmp_path / "spool") as relay:
        client, _ = await Client.connect(relay.port)
        assert (await client.cmd("EHLO c.example.net")).startswith("250")
        assert (await client.cmd("MAIL FROM:<a@example.net>")).startswith("250")
        reply = await client.cmd(b"RCPT TO:<b@example.net> X\xff")
        assert reply == "555 5.5.4 RCPT TO parameters not recognised: X\\xff"
        assert (await client.cmd(b"RSET")).startswith("250")
        reply = await client.cmd(b"MAIL FROM:<a@example.net> X\xfe")
        assert reply == "555 5.5.4 MAIL FROM parameter not recognised: X\\xfe"
        await client.send(b"FOO\rBAR\r\n")
        assert (await client.reply()).startswith('500 5.5.2 Error: command "FOO\\rBAR"')
        assert (await _mail(client, MESSAGE)).startswith("250 2.0.0")
