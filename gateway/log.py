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

Much of what is logged comes from clients (HELO names, addresses, replies of far ends): every
field, message and traceback line goes through :func:`printable`, which escapes control
characters, so no client can forge a log line, hide text or drive an operator's terminal.  The
CLI's printers (``smg queue``, ``smg explain``) use the same function.
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


# What :func:`printable` escapes: C0 and C1 controls, DEL, surrogates (aiosmtpd's
# surrogateescape of bytes that were not UTF-8), line and paragraph separators and the bidi
# overrides that reorder what a terminal shows.  The backslash is escaped too, so an escape is
# never ambiguous with text that looked like one.
_UNSAFE = "\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_RE = re.compile(f"[{_UNSAFE}]")
_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8: show the byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, keep: str = "") -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u202e``) and
    ``\\`` doubled; characters in ``keep`` (a tab in a header block) stay as they are."""
    if not _UNSAFE_RE.search(text):
        return text  # the usual case: one C-level scan
    return _UNSAFE_RE.sub(lambda m: m[0] if m[0] in keep else _escape(m[0]), text)


# One C-level scan per value (hot path): only a value it finds anything in is looked at again.
_ATTENTION = re.compile(f'[ "={_UNSAFE}]')


def _text_value(value: Any) -> str:
    text = str(value)
    if text == "":
        return '""'
    if not _ATTENTION.search(text):
        return text
    text = printable(text)
    if " " in text or '"' in text or "=" in text:
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _json_value(value: Any) -> Any:
    """A field for the JSON line: its shape kept, every string in it escaped."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {printable(str(key)): _json_value(item) for key, item in value.items()}
    return printable(value if isinstance(value, str) else str(value))


def _printable_lines(text: str) -> str:
    """A traceback: its lines kept, each escaped and indented, so that a newline in an
    exception's message cannot start a line that looks like a log line of its own."""
    return "\n".join("  " + printable(line) for line in text.split("\n"))


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
            text = f"{head} {printable(record.getMessage())}"
        else:
            fields = getattr(record, _FIELDS, {})
            parts = [f"{key}={_text_value(value)}" for key, value in fields.items()]
            text = " ".join([head, name, *parts])
        if record.exc_info:
            text += "\n" + _printable_lines(self.formatException(record.exc_info))
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
            data["message"] = printable(record.getMessage())
        else:
            data["event"] = name
            for key, value in getattr(record, _FIELDS, {}).items():
                data.setdefault(key, _json_value(value))
        if record.exc_info:
            data["exception"] = _printable_lines(self.formatException(record.exc_info))
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
