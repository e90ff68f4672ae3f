"""The relay's mail log: one line per event, with the queue id, like Postfix's.

Every module logs through the standard ``logging`` package under the ``smg`` logger.  Events
that an operator greps for (a message received, rejected, each delivery attempt, deferred,
bounced, expired) go through :func:`event`, which attaches the queue id and the fields::

    event(log, "received", queue_id="0H1K2...", client="127.0.0.1", sender="a@example.net",
          nrcpt=2, size=5120)

With ``gateway.log_format = "text"`` (default) that is written as::

    2024-05-01T12:00:00.123Z smg[4711]: 0H1K2...: received client=127.0.0.1 sender=<a@...> ...

and with ``"json"`` as one JSON object per line (``ts``, ``level``, ``event``, ``queue_id``
and the fields), for log shippers.  Lines go to stderr, which systemd's journal collects.
Plain log calls (``log.warning("...")``) come out as lines without an event.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, TextIO

ROOT = "smg"
_EVENT = "smg_event"
_FIELDS = "smg_fields"
_QUEUE_ID = "smg_queue_id"


def event(
    logger: logging.Logger,
    name: str,
    queue_id: str | None = None,
    *,
    level: int = logging.INFO,
    **fields: Any,
) -> None:
    """Log one mail event (``received``, ``reject``, ``delivered``...) with its fields."""
    if not logger.isEnabledFor(level):
        return
    extra = {_EVENT: name, _FIELDS: fields, _QUEUE_ID: queue_id}
    logger.log(level, name, extra=extra)


def _timestamp(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


_NEEDS_QUOTES = re.compile(r'[ "=\\\n\r]')  # one C-level scan per value (hot path)


def _text_value(value: Any) -> str:
    text = str(value)
    if text == "" or _NEEDS_QUOTES.search(text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """``TIME smg[PID]: QUEUEID: event key=value ...`` (values with spaces are quoted)."""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{_timestamp(record.created)} smg[{os.getpid()}]:"
        queue_id = getattr(record, _QUEUE_ID, None)
        if queue_id:
            head += f" {queue_id}:"
        if record.levelno >= logging.WARNING:
            head += f" {record.levelname.lower()}:"
        name = getattr(record, _EVENT, None)
        if name is None:
            text = f"{head} {record.getMessage()}"
        else:
            fields = getattr(record, _FIELDS, {})
            parts = [f"{key}={_text_value(value)}" for key, value in fields.items()]
            text = " ".join([head, name, *parts])
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event``/``message``, fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        queue_id = getattr(record, _QUEUE_ID, None)
        if queue_id:
            data["queue_id"] = queue_id
        name = getattr(record, _EVENT, None)
        if name is None:
            data["message"] = record.getMessage()
        else:
            data["event"] = name
            for key, value in getattr(record, _FIELDS, {}).items():
                data.setdefault(key, value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def setup_logging(
    log_format: str = "text", level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Send the ``smg`` logger to ``stream`` (stderr) in ``log_format``; idempotent, so a
    reload with a new format just swaps the formatter."""
    logger = logging.getLogger(ROOT)
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler = next((h for h in logger.handlers if getattr(h, "_smg", False)), None)
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler._smg = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    handler.setFormatter(formatter)
    logger.setLevel(level)
    logger.propagate = False
    # aiosmtpd logs every command at INFO under "mail.log": keep only its warnings.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
