"""Byte-exact work on a message's header block: read, remove and prepend header fields.

The cleanup step changes only the header fields it means to change; every other byte of the
message (other headers, their folding, the body) is kept as it came, so DKIM signatures made
before us and the body hash stay valid.  Messages with CRLF or bare LF line ends both work; new
fields use the message's own line end.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def line_end(data: bytes) -> bytes:
    """The message's line end: CRLF if its first line ends so, else LF."""
    first = data.find(b"\n")
    return b"\r\n" if first > 0 and data[first - 1 : first] == b"\r" else b"\n"


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header block including its last line end, the rest from the empty line on)."""
    cut = header_end(data)
    return data[:cut], data[cut:]


def header_end(data: bytes) -> int:
    """Where :func:`split_header` cuts, without copying either part."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    ends = [pos for pos in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if pos >= 0]
    if not ends:
        return len(data)
    cut = min(ends)
    return cut + (2 if data[cut : cut + 4] == b"\r\n\r\n" else 1)


def fields(header: bytes) -> list[tuple[str, bytes]]:
    """The header block as (lower-case name, raw field bytes with continuation lines).

    A line that is neither a field nor a continuation is kept as its own entry named ""."""
    result: list[tuple[str, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and result:
            name, raw = result[-1]
            result[-1] = (name, raw + line)
            continue
        match = _FIELD_NAME.match(line)
        name = match.group(1).decode("ascii").lower() if match else ""
        result.append((name, line))
    return result


def get_values(data: bytes, name: str) -> list[str]:
    """The unfolded values of every field called ``name`` (case-insensitive), in order."""
    wanted = name.lower()
    header = split_header(data)[0]
    if wanted.encode() not in header.lower():  # the usual case: not there at all
        return []
    values = []
    for field_name, raw in fields(header):
        if field_name == wanted:
            value = raw.split(b":", 1)[1]
            unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", value).strip()
            values.append(unfolded.decode("utf-8", "replace"))
    return values


def remove(data: bytes, names: Iterable[str]) -> bytes:
    """``data`` without the fields whose names are in ``names`` (case-insensitive)."""
    header, rest = split_header(data)
    lowered = header.lower()
    drop = {name.lower() for name in names if name.lower().encode() in lowered}
    if not drop:  # none of them is there: nothing to parse
        return data
    entries = fields(header)
    if not any(name in drop for name, _ in entries):
        return data
    return b"".join(raw for name, raw in entries if name not in drop) + rest


def prepend(
    data: bytes, new_fields: Iterable[tuple[str, str]], eol_bytes: bytes | None = None
) -> bytes:
    """``data`` with ``Name: value`` fields added on top, in the order given (``eol_bytes``:
    the line end, when ``data`` is a header block cut from its message)."""
    eol = (eol_bytes or line_end(data)).decode()
    lines = []
    for name, value in new_fields:
        # A value never carries its own line breaks: they could forge further fields.
        flat = " ".join(value.split())
        lines.append(f"{name}: {fold(flat, len(name) + 2)}".replace("\n", eol) + eol)
    return "".join(lines).encode("utf-8") + data


def fold(value: str, first_line_used: int = 0, width: int = 78) -> str:
    """Fold a value at spaces so that lines stay within ``width`` (unbreakable words stay).

    The space a line is broken at starts the continuation line, so unfolding (removing the
    line ends) gives the value back exactly.  :func:`prepend` turns ``\\n`` into the message's
    own line end."""
    words = value.split(" ")
    lines: list[str] = []
    current = ""
    budget = width - first_line_used
    for word in words:
        candidate = f"{current} {word}" if current else word
        if len(candidate) > budget and current:
            lines.append(current)
            current = word
            budget = width - 1
        else:
            current = candidate
    lines.append(current)
    return "\n ".join(lines)
