"""A redundant monitor without shared state: leader with fallback (docs/blacklist.md).

The monitor hosts are ranked (``blacklist_monitor_hosts`` in the inventory).  The first, the
leader, checks and notifies at the scheduled time.  Each later one starts at the same time,
waits ``--defer-wait`` seconds, then checks too, but before it notifies it asks whether a host
ranked before it is up (its relay answers on port 25): if one is, that host notified (or, its
timer being persistent, will as soon as it is back), and this one records the results without
sending anything.  Only when every host before it is down does it notify itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from email.message import EmailMessage
from typing import Any

PROBE_TIMEOUT = 5.0


async def first_up(hosts: list[tuple[str, int]], timeout: float = PROBE_TIMEOUT) -> str | None:
    """``host:port`` of the first of ``hosts`` that accepts a TCP connection, else None."""
    for host, port in hosts:
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return f"{host}:{port}"
    return None


class LeaderNotifies:
    """The notifier of a fallback monitor whose leader is up: nothing is sent, every item
    counts as delivered (the leader sent it), so the state stays the same on both hosts and
    a later fallback does not repeat an old notice."""

    def __init__(self, leader: str, ticket_id_field: str) -> None:
        self.leader = leader
        self.ticket_id_field = ticket_id_field
        self.skipped: list[str] = []

    async def send_mail(self, message: EmailMessage) -> None:
        self.skipped.append(str(message["Subject"]))

    async def post_json(
        self, url: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any]:
        self.skipped.append(f"POST {url}")
        return {self.ticket_id_field: f"(opened by {self.leader})"}
