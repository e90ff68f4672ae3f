"""SMTP envelope addresses as RFC 5321 (and RFC 6531 for SMTPUTF8) spells them.

The intake only cuts the path out of ``MAIL FROM:``/``RCPT TO:`` (:func:`split_path`); the
policy rules parse it (:func:`parse_path`) and decide, so ``smg explain`` shows the same
verdict for the same address.  The parser keeps what relay tricks need to be seen: a source
route (``<@a,@b:user@c>``), a quoted local part and its content, an address literal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3

# atext (RFC 5322 3.2.3); with SMTPUTF8 any non-ASCII character is atext too (RFC 6531 3.3).
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9\u0080-\U0010ffff-]{1,63}(?<!-)")
_ADDRESS_LITERAL = re.compile(r"\[[^\[\]\\]*\]")


class AddressError(ValueError):
    """The text is not a valid SMTP path; the message says why, for the SMTP reply."""


@dataclass(frozen=True)
class Mailbox:
    """One parsed path.  ``local`` is as written (quotes kept), ``local_text`` unquoted."""

    local: str
    domain: str  # "" only for a path without a domain (``<postmaster>``)
    route: str = ""  # the source route as written ("@a,@b"), "" when there is none
    quoted: bool = False

    @property
    def local_text(self) -> str:
        if not self.quoted:
            return self.local
        return re.sub(r"\\(.)", r"\1", self.local[1:-1])

    @property
    def is_address_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def address(self) -> str:
        """The mailbox without any source route."""
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_ascii(self) -> bool:
        return self.address.isascii()


def split_path(arg: str) -> tuple[str, str]:
    """``"<a@b> SIZE=10"`` -> ``("a@b", "SIZE=10")``.

    The angle brackets are required by RFC 5321; like Postfix we also take a bare address
    without spaces.  A ``>`` inside a quoted local part does not end the path.
    """
    text = arg.strip()
    if not text.startswith("<"):
        path, _, rest = text.partition(" ")
        if not path or "<" in path or ">" in path:
            raise AddressError("the address must be written <local@domain>")
        return path, rest.strip()
    index, quoted = 1, False
    while index < len(text):
        char = text[index]
        if quoted and char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            rest = text[index + 1 :]
            if rest and not rest.startswith(" "):
                raise AddressError("a space must separate the address from its parameters")
            return text[1:index], rest.strip()
        index += 1
    raise AddressError("the address has no closing '>'")


def parse_path(path: str) -> Mailbox:
    """Parse the inside of ``<...>`` (not empty: the null sender is the caller's case)."""
    if len(path) > MAX_PATH:
        raise AddressError(f"the address is longer than {MAX_PATH} characters")
    route = ""
    if path.startswith("@"):
        route, colon, path = path.partition(":")
        if not colon or not all(_is_domain(hop[1:]) for hop in route.split(",")):
            raise AddressError("malformed source route")
    local, domain = _split_local_domain(path)
    quoted = local.startswith('"')
    if quoted:
        if not _QUOTED_STRING.fullmatch(local):
            raise AddressError("malformed quoted local part")
    elif not _DOT_STRING.fullmatch(local):
        raise AddressError(f"invalid characters or dots in the local part {local!r}")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError(f"the local part is longer than {MAX_LOCAL_PART} octets")
    if domain and not (_ADDRESS_LITERAL.fullmatch(domain) or _is_domain(domain)):
        raise AddressError(f"invalid domain {domain!r}")
    return Mailbox(local, domain, route, quoted)


def _split_local_domain(path: str) -> tuple[str, str]:
    if path.startswith('"'):
        match = _QUOTED_STRING.match(path)
        if not match:
            raise AddressError("malformed quoted local part")
        local, rest = match.group(0), path[match.end() :]
        if rest and not rest.startswith("@"):
            raise AddressError("text after the quoted local part")
        return local, rest[1:]
    if "@" not in path:
        if not path:
            raise AddressError("empty address")
        return path, ""
    local, _, domain = path.rpartition("@")
    if not local:
        raise AddressError("empty local part")
    if not domain:
        raise AddressError("empty domain")
    return local, domain


def _is_domain(name: str) -> bool:
    name = name.rstrip(".") if name.endswith(".") and not name.endswith("..") else name
    if not name or len(name.encode()) > MAX_DOMAIN:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))
