"""A property-based fuzz test of the intake (issue 12): random command streams against the real
intake (an in-process ``Intake`` over a real socket, the real spool in a temporary directory).

Each example is one SMTP session: commands and message data from a small grammar (EHLO names
with bad bytes, MAIL/RCPT with odd parameters, DATA with dots, NULs, long lines, invalid UTF-8),
every line ended by CRLF, LF, CR or nothing, all sent pipelined in random pieces, then a
terminator that ends any DATA and a QUIT.  The properties:

- the relay never crashes: the session answers until the QUIT's ``221`` (or a ``421``), logs
  no error, no reply is ``451 4.3.0`` (an exception in a handler or the queueing), and a new
  connection still takes a message;
- every ``250`` to DATA names a message that is in the spool, and the spool grew by exactly the
  number of those replies: one DATA never stores two messages and never a message it refused;
- what is stored is mail: no NUL, no bare CR or LF.

Bounded for CI: 400 examples (``max_examples``) with a 10 s deadline each run in about 5 s
here; a failure's shrinking takes up to a minute.  It found that a reply quoting a parameter
with bytes that were not UTF-8 raised in aiosmtpd (``451 4.3.0``); on the code before issue 12
it finds the NUL byte that reached the spool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import re
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import aiosmtpd.smtp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.real_spool_relay import RealRelay, real_spool_relay
from tests.unit.test_intake import MESSAGE, Client

pytestmark = pytest.mark.timeout(180)

# Mostly CRLF, so that many sessions get as far as DATA and a 250; the others often enough.
ENDINGS = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b""])
JUNK = st.binary(max_size=40)
NAMES = st.one_of(
    st.sampled_from([b"client.example.net", b"[127.0.0.1]", b"x", b""]),
    st.binary(min_size=1, max_size=30),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
SENDERS = st.sampled_from(
    [b"<a@example.net>"] * 10
    + [b"<>", b"<a@nope.test>", b"a@example.net", b"<\xff@example.net>", b"<a\x00@example.net>"]
)
MAIL_PARAMS = st.sampled_from(
    [b""] * 10
    + [b" SIZE=100", b" SIZE=999999", b" BODY=8BITMIME", b" SMTPUTF8", b" FOO=bar", b" SIZE="]
)
RECIPIENTS = st.sampled_from(
    [b"<b@example.net>"] * 8
    + [b"<c@example.net>", b"<b@example.net> NOTIFY=NEVER", b"<\x00@x>", b"<\xc3\xa9@example.net>"]
)


def _line(command: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A command or data line with one of the line endings (or none)."""
    return st.tuples(command, ENDINGS).map(b"".join)


_CLEAN_LINES = st.one_of(
    st.sampled_from([b"Subject: fuzz", b"", b".", b"..", b". x", b"From: a@example.net"]),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
BODY_LINES = st.one_of(
    _CLEAN_LINES,  # three times: most messages should get through, many should not
    _CLEAN_LINES,
    _CLEAN_LINES,
    st.binary(max_size=60),
    st.binary(min_size=101, max_size=300),  # longer than max_line_length (100)
    st.just(b"a\x00b"),
    st.just(b"caf\xc3\xa9 \xff\xfe"),
)
END_OF_DATA = st.sampled_from([b"\r\n.\r\n", b".\r\n", b"\n.\n", b"\r.\r", b"\r\n.\n", b""])


@st.composite
def transactions(draw: st.DrawFn) -> bytes:
    """MAIL, RCPT(s), DATA and a message: mostly well formed, so that DATA is reached."""
    parts = [b"MAIL FROM:" + draw(SENDERS) + draw(MAIL_PARAMS) + draw(ENDINGS)]
    rcpts = _line(RECIPIENTS.map(lambda r: b"RCPT TO:" + r))
    parts += draw(st.lists(rcpts, min_size=1, max_size=3))
    parts.append(b"DATA" + draw(ENDINGS))
    parts += draw(st.lists(_line(BODY_LINES), max_size=8))
    parts.append(draw(END_OF_DATA))
    return b"".join(parts)


COMMANDS = st.one_of(
    transactions(),  # listed three times: half of the commands are whole transactions
    transactions(),
    transactions(),
    _line(st.tuples(st.sampled_from([b"EHLO ", b"HELO ", b"ehlo "]), NAMES).map(b"".join)),
    _line(st.sampled_from([b"RSET", b"NOOP", b"HELP", b"VRFY x", b"STARTTLS", b"AUTH PLAIN"])),
    _line(st.sampled_from([b"DATA", b"MAIL FROM:<a@example.net>", b"RCPT TO:<b@example.net>"])),
    _line(JUNK),
    st.binary(min_size=600, max_size=9000).map(lambda b: b.replace(b"\n", b"")),  # long line
)
STREAMS = st.lists(COMMANDS, max_size=8).map(b"".join)

# Whatever state the stream left: end a DATA in progress (only CRLF.CRLF does), then QUIT.
FINISH = b"\r\n.\r\nQUIT\r\n"
# How a session may end: QUIT, or a timeout or limit (421).
CLOSING = (b"221 ", b"421 ")
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (\w+)\r?$", re.M)


class _Errors(logging.Handler):
    """ERROR records of the relay's loggers: an exception in a session or in queueing."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclasses.dataclass
class Fuzz:
    loop: asyncio.AbstractEventLoop
    relay: RealRelay
    errors: _Errors


@pytest.fixture(scope="module")
def fuzz() -> Iterator[Fuzz]:
    """One relay (and event loop) for every example: starting one per example would spend the
    time budget on set-up.

    aiosmtpd closes a session after five unrecognised commands (BOGUS_LIMIT); with the rest of
    a pipeline unread, the close is a reset that also drops the replies still in flight, and the
    properties could not be checked.  Random bytes make such commands all the time, so the limit
    is raised here: the relay's own rules are what is under test."""
    errors = _Errors()
    logging.getLogger("smg").addHandler(errors)
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(aiosmtpd.smtp, "BOGUS_LIMIT", 10**6)
        context = real_spool_relay(Path(tmp) / "spool", max_connections=20)
        relay = loop.run_until_complete(context.__aenter__())
        try:
            yield Fuzz(loop, relay, errors)
        finally:
            loop.run_until_complete(context.__aexit__(None, None, None))
            loop.close()
            logging.getLogger("smg").removeHandler(errors)


async def _session(relay: RealRelay, greeting: bytes, stream: bytes, cuts: list[int]) -> bytes:
    """Send ``stream`` pipelined in pieces cut at ``cuts``, then FINISH; every reply byte.
    The replies are read while sending, as a pipelining client does."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    replies = bytearray()

    async def read_all() -> None:
        while chunk := await reader.read(65536):
            replies.extend(chunk)

    reading = asyncio.create_task(read_all())
    data = greeting + stream + FINISH
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    try:
        for start, end in itertools.pairwise(edges):
            writer.write(data[start:end])
            await writer.drain()
            await asyncio.sleep(0)
        await asyncio.wait_for(reading, 15)  # until the relay closes
    finally:
        reading.cancel()
        writer.close()
    return bytes(replies)


async def _stored(relay: RealRelay) -> int:
    return sum((await relay.spool.counts()).values())


async def _check_example(fuzz: Fuzz, greeting: bytes, stream: bytes, cuts: list[int]) -> None:
    relay = fuzz.relay
    before = await _stored(relay)
    replies = await _session(relay, greeting, stream, cuts)
    # CRLF ends a reply line; aiosmtpd echoes an unknown command, bare CRs and all.
    lines = replies.removesuffix(b"\r\n").split(b"\r\n")
    assert lines and lines[0].startswith(b"220 "), replies[:200]
    assert lines[-1].startswith(CLOSING), replies[-300:]  # answered to the end
    assert not any(line.startswith(b"451 4.3.0") for line in lines), replies
    assert not fuzz.errors.records, [r.getMessage() for r in fuzz.errors.records]
    queued = QUEUED.findall(replies)
    event(f"messages queued: {min(len(queued), 2)}")
    event(f"session ended by: {lines[-1][:3].decode()}")
    assert len(set(queued)) == len(queued)
    assert await _stored(relay) - before == len(queued), replies  # one message per 250, no more
    for queue_id in queued:
        message = await relay.spool.load(queue_id.decode())
        assert message is not None, queue_id
        assert b"\x00" not in message.data
        assert message.data.count(b"\r") == message.data.count(b"\n") == message.data.count(b"\r\n")
    # A new connection still works.
    client, banner = await Client.connect(relay.port)
    try:
        assert banner.startswith("220"), banner
        await client.start_mail()
        assert (await client.cmd(MESSAGE + b".")).startswith("250 2.0.0"), "new session failed"
        assert (await client.cmd("QUIT")).startswith("221")
    finally:
        client.close()


@settings(
    max_examples=400,
    deadline=timedelta(seconds=10),
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    greeting=st.sampled_from([b"EHLO fuzz.example.net\r\n"] * 4 + [b"HELO fuzz\r\n", b""]),
    stream=STREAMS,
    cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=6),
)
def test_intake_survives_random_streams(
    fuzz: Fuzz, greeting: bytes, stream: bytes, cuts: list[int]
) -> None:
    fuzz.errors.records.clear()
    fuzz.loop.run_until_complete(_check_example(fuzz, greeting, stream, cuts))
