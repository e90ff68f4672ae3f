"""The mail log (gateway.log) and the Prometheus endpoint (gateway.metrics)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.log import event, setup_logging
from gateway.metrics import Metrics


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream for the smg handler; afterwards the logging set-up is as it was (other tests
    use caplog, which needs smg.* records to propagate)."""
    root = logging.getLogger("smg")
    saved = (list(root.handlers), root.propagate, root.level)
    yield io.StringIO()
    root.handlers[:] = saved[0]
    root.propagate, root.level = saved[1], saved[2]


def _log(stream: io.StringIO, log_format: str) -> logging.Logger:
    setup_logging(log_format, stream=stream)
    logger = logging.getLogger("smg.test")
    # setup_logging keeps one handler and swaps its formatter: point it at this test's stream
    handler = next(h for h in logging.getLogger("smg").handlers if getattr(h, "_smg", False))
    handler.setStream(stream)  # type: ignore[attr-defined]
    return logger


def test_text_lines_like_postfix(stream: io.StringIO) -> None:
    logger = _log(stream, "text")
    event(logger, "received", "1K19", client="10.1.2.3", sender="<a@b.example>", nrcpt=2)
    event(logger, "reject", "NOQUEUE", reply="550 5.1.8 Sender Domain must resolve", rcpt="")
    event(logger, "reload_failed", level=logging.ERROR, error="x")
    logger.warning("plain %s", "message")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(": 1K19: received client=10.1.2.3 sender=<a@b.example> nrcpt=2")
    assert " smg[" in lines[0] and lines[0][:4].isdigit()
    assert lines[1].endswith(
        ': NOQUEUE: reject reply="550 5.1.8 Sender Domain must resolve" rcpt=""'
    )
    assert ": error: reload_failed error=x" in lines[2]
    assert lines[3].endswith(": warning: plain message")


def test_json_lines(stream: io.StringIO) -> None:
    logger = _log(stream, "json")
    event(logger, "received", "1K19", client="10.1.2.3", nrcpt=2, tls=True)
    logger.info("hello")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "received" and first["queue_id"] == "1K19"
    assert first["nrcpt"] == 2 and first["tls"] is True and first["logger"] == "smg.test"
    assert second["message"] == "hello" and "event" not in second


async def test_metrics_render_and_http() -> None:
    metrics = Metrics()
    metrics.inc("received")
    metrics.inc("received")
    metrics.inc("rejected", stage="mail", reason="sender_domain")
    metrics.inc("rejected", stage="data", reason='we"ird\nreason')
    metrics.delivery_outcome("sent")
    metrics.delivery_outcome("bounced")

    async def queue() -> dict:
        return {(("state", "active"),): 3.0, (("state", "held"),): 1.0}

    metrics.gauge_source("smg_queue_messages", "Messages in the queue by state.", queue)
    text = await metrics.render()
    assert "# TYPE smg_messages_received_total counter\nsmg_messages_received_total 2" in text
    assert 'smg_messages_rejected_total{reason="sender_domain",stage="mail"} 1' in text
    assert 'reason="we\\"ird\\nreason"' in text
    assert "smg_recipients_delivered_total 1" in text and "smg_recipients_bounced_total 1" in text
    assert 'smg_queue_messages{state="held"} 1' in text
    server = await metrics.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await _get(port, "/metrics")
        assert ok.startswith("HTTP/1.0 200 OK") and "text/plain; version=0.0.4" in ok
        assert "smg_messages_received_total 2" in ok
        assert (await _get(port, "/")).startswith("HTTP/1.0 404")
    finally:
        await metrics.close()


async def test_a_failing_gauge_does_not_break_the_scrape() -> None:
    metrics = Metrics()

    async def broken() -> dict:
        raise RuntimeError("spool busy")

    metrics.gauge_source("smg_queue_messages", "help", broken)
    metrics.inc("received")
    assert "smg_messages_received_total 1" in await metrics.render()


async def _get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data.decode()


# Client-controlled text with control characters: a forged line, a terminal escape, a bidi
# override, a byte that was not UTF-8 (aiosmtpd's surrogateescape), DEL and a C1 control.
HOSTILE = "evil\r\n2024-05-01T00:00:00.000Z smg[1]: forged \x1b[2J\u202etxt\udcff\x7f\x85"
ESCAPED = "evil\\r\\n2024-05-01T00:00:00.000Z smg[1]: forged \\x1b[2J\\u202etxt\\xff\\x7f\\x85"


def test_text_log_escapes_control_characters(stream: io.StringIO) -> None:
    logger = _log(stream, "text")
    event(logger, "reject", "NOQUEUE", helo=HOSTILE, path="a\\b", tab="x\ty")
    logger.warning("plain %s", HOSTILE)
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    lines = text.splitlines()
    assert lines[0].endswith(f'reject helo="{ESCAPED}" path=a\\\\b tab=x\\ty')
    assert lines[1].endswith(f"warning: plain {ESCAPED}")
    assert "\n  ValueError: evil\\r\n  2024-05-01T00:00:00.000Z smg[1]: forged \\x1b[2J" in text
    assert not any(line.startswith("2024-05-01T00:00:00.000Z smg[1]") for line in lines)
    assert all(c.isprintable() for c in text.replace("\n", ""))


def test_json_log_escapes_control_characters(stream: io.StringIO) -> None:
    logger = _log(stream, "json")
    event(logger, "reject", "NOQUEUE", helo=HOSTILE, rcpts=[HOSTILE], n=2)
    logger.warning("plain %s", HOSTILE)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["helo"] == ESCAPED and first["rcpts"] == [ESCAPED] and first["n"] == 2
    assert second["message"] == f"plain {ESCAPED}"
