"""What arrived at the lab's mail servers, indexed by the tag in the Message-ID.

The far ends (Postfix in ``mx-tls``/``mx-plain``) and the customer's own mail server (the
sink in ``customer``, which gets the NDRs) store one file per message and recipient in a
Maildir, with ``X-Original-To:`` (envelope recipient), ``Return-Path:`` (envelope sender) and
a first ``Received:`` header naming the client address and, at mx-tls, the TLS protocol.

``Arrivals.refresh()`` reads only files it has not seen (headers only), so polling a mailbox
with thousands of messages stays cheap.
"""

from __future__ import annotations

import email.policy
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path

RECEIVED_CLIENT_RE = re.compile(r"\[([0-9.]+)\]")
RECEIVED_TLS_RE = re.compile(r"\(using (TLSv[0-9.]+)")
TAG_RE = re.compile(r"<([^@>\s]+)@")
VERDICT_HEADER = "X-SMG-Verdict"
_PARSER = BytesHeaderParser(policy=email.policy.compat32)


@dataclass(frozen=True)
class Arrival:
    server: str  # "mx-tls", "mx-plain", "customer"
    path: Path
    tag: str  # the local part of the Message-ID ("" if none)
    recipient: str
    sender: str  # "" for NDRs
    client_address: str | None  # the gateway that handed it over
    tls_protocol: str | None  # "TLSv1.3", None when it came in clear
    has_verdict_header: bool
    has_dkim_signature: bool
    subject: str
    content_type: str

    def read(self) -> bytes:
        return self.path.read_bytes()


def read_arrival(server: str, path: Path) -> Arrival:
    with open(path, "rb") as f:
        head = _PARSER.parse(f)
    received = str((head.get_all("Received") or [""])[0])
    client = RECEIVED_CLIENT_RE.search(received)
    tls = RECEIVED_TLS_RE.search(received)
    tag = TAG_RE.search(str(head.get("Message-ID", "")))
    return Arrival(
        server=server,
        path=path,
        tag=tag.group(1) if tag else "",
        recipient=str(head.get("X-Original-To", "")).strip(),
        sender=str(head.get("Return-Path", "")).strip().strip("<>"),
        client_address=client.group(1) if client else None,
        tls_protocol=tls.group(1) if tls else None,
        has_verdict_header=head.get(VERDICT_HEADER) is not None,
        has_dkim_signature=head.get("DKIM-Signature") is not None,
        subject=str(head.get("Subject", "")),
        content_type=str(head.get("Content-Type", "")),
    )


class Arrivals:
    """Incremental index over Maildirs: ``{server: maildir}`` (the directory with new/, cur/)."""

    def __init__(self, maildirs: dict[str, Path]) -> None:
        self.maildirs = maildirs
        self._seen: set[Path] = set()
        self.all: list[Arrival] = []
        self.by_tag: dict[str, list[Arrival]] = defaultdict(list)

    def refresh(self) -> int:
        """Read the files that appeared since the last call; returns how many."""
        added = 0
        for server, box in self.maildirs.items():
            for sub in ("new", "cur"):
                folder = box / sub
                if not folder.is_dir():
                    continue
                for path in folder.iterdir():
                    if path in self._seen or not path.is_file():
                        continue
                    try:
                        arrival = read_arrival(server, path)
                    except FileNotFoundError:  # moved new/ -> cur/ meanwhile: next round
                        continue
                    self._seen.add(path)
                    self.all.append(arrival)
                    self.by_tag[arrival.tag].append(arrival)
                    added += 1
        return added

    def tagged(self, tag: str) -> list[Arrival]:
        self.refresh()
        return list(self.by_tag.get(tag, []))

    def matching(self, match: Callable[[Arrival], bool]) -> list[Arrival]:
        self.refresh()
        return [a for a in self.all if match(a)]

    def skip_existing(self) -> int:
        """Mark every file already stored as seen without reading it (a run's baseline)."""
        skipped = 0
        for box in self.maildirs.values():
            for sub in ("new", "cur"):
                folder = box / sub
                if folder.is_dir():
                    for path in folder.iterdir():
                        self._seen.add(path)
                        skipped += 1
        return skipped

    def wait_for(self, tags: Iterable[str], *, timeout: float, interval: float = 0.25) -> set[str]:
        """Bounded wait until every tag has arrived at least once; returns the missing ones."""
        missing = set(tags)
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            missing = {t for t in missing if not self.by_tag.get(t)}
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(interval)

    def wait_until(
        self, match: Callable[[Arrival], bool], count: int = 1, *, timeout: float
    ) -> list[Arrival]:
        """Bounded wait for ``count`` arrivals that ``match``; returns those found (maybe fewer)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(match)
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.25)


def lab_maildirs(state: dict, customer_maildir: Path | None = None) -> dict[str, Path]:
    """The far ends' Maildirs from lab/run/state.json, plus the customer sink's if given."""
    boxes = {name: Path(facts["mail_dir"]) / "maildir" for name, facts in state["far_ends"].items()}
    if customer_maildir is not None:
        boxes["customer"] = customer_maildir
    return boxes
