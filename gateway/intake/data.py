"""The DATA checks, done piece by piece as the message is read (``GatewaySMTP._read_data``).

The message is never joined here: the pieces (dot-unstuffed) go to the handler, which joins
them once behind its Received: header.  Each check keeps a few numbers across pieces, so no
full copy of the message is made for it (before: the joined bytes, the unstuffed copy and a
list of every line were alive at once).  The reader never cuts a piece between a CR and its LF
(see ``GatewaySMTP._read_data``), so a CRLF is always inside one piece.
"""

from __future__ import annotations

import re

HOPS_HEADER_SCAN = 1 << 20  # Received: headers are counted in the first MiB of the header


class DataPieces:
    """What a DATA phase read so far: the unstuffed pieces, the raw size and what the checks
    need to carry from one piece to the next."""

    def __init__(self, max_line: int) -> None:
        self.pieces: list[bytes] = []
        self.size = 0  # raw bytes, before unstuffing (what SIZE and the limit count)
        self.tail = b"\r\n"  # the last two raw bytes: the DATA command line ended a line
        self.max_line = max_line
        self.longest = 0  # longest line seen (unstuffed), once it is over max_line
        self._line = 0  # length of the line the last piece left open
        self._cr = self._lf = self._crlf = 0
        self.has_nul = False  # RFC 5322 forbids NUL; a next hop that drops it sees other data
        self.keep = True  # False: too large or out of memory budget, the bytes are dropped

    def add(self, raw: bytes) -> None:
        """One raw piece (never ending between CR and LF): count, check, unstuff, keep."""
        self.size += len(raw)
        self._cr += raw.count(b"\r")
        self._lf += raw.count(b"\n")
        self._crlf += raw.count(b"\r\n")
        self.has_nul = self.has_nul or b"\x00" in raw
        text = raw[1:] if raw[:1] == b"." and self.tail == b"\r\n" else raw
        text = text.replace(b"\r\n.", b"\r\n")  # the same object when nothing is stuffed
        self._check_lines(text)
        if raw:
            self.tail = raw[-2:] if len(raw) >= 2 else (self.tail + raw)[-2:]
        if self.keep:
            self.pieces.append(text)

    def drop(self) -> None:
        """Keep nothing more (the message will be refused): the memory goes at once."""
        self.keep = False
        self.pieces.clear()

    def _check_lines(self, text: bytes) -> None:
        last = text.rfind(b"\r\n")
        if self._line + len(text) > self.max_line:  # only then can a line be too long
            parts = text.split(b"\r\n")  # one piece's lines: bounded by the reader's limit
            first = self._line + len(parts[0])
            self.longest = max(self.longest, first, *map(len, parts[1:]))
        self._line = self._line + len(text) if last < 0 else len(text) - last - 2

    @property
    def bare_line_ending(self) -> bool:
        return self._lf != self._crlf or self._cr != self._crlf

    def hops(self) -> int:
        """Received: header fields, counted in the header block's first MiB."""
        head = bytearray()
        for piece in self.pieces:
            start = max(len(head) - 3, 0)
            head += piece
            if head.find(b"\r\n\r\n", start) >= 0 or len(head) >= HOPS_HEADER_SCAN:
                break
        end = head.find(b"\r\n\r\n")
        block = bytes(head if end < 0 else head[: end + 2])
        return len(re.findall(rb"(?im)^received:", block))
