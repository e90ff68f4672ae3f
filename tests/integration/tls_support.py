"""Shared pieces of the forced-TLS, MTA-STS and probe integration tests.

- :class:`TlsRelay`: ``smg serve`` with ``[[tls_policy.rules]]`` written into its TOML.
- :class:`PolicyServer`: re-exported from the unit tests (HTTPS on a 127.0.0.x address).
- :func:`started_far_ends`: one Postfix far end per MX, started and closed together.
- small helpers: a port free on several addresses, sending with swaks, waiting for states.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.harness import TestCA, common_port, wait_for
from tests.harness.postfix import PostfixFarEnd, ReceivedMessage
from tests.harness.swaks import swaks
from tests.integration.smg_relay import SMG, SmgRelay, queued_as, to_toml
from tests.unit.test_mta_sts import PolicyServer

__all__ = [
    "PolicyServer",
    "TlsRelay",
    "common_port",
    "mail_from_logged",
    "queue_entry",
    "send",
    "smg",
    "started_far_ends",
    "with_mid",
]


@contextmanager
def started_far_ends(
    far_ends: dict[str, tuple[str, str]], port: int, ca: TestCA, hostname: Callable[[str], str]
) -> Iterator[dict[str, PostfixFarEnd]]:
    """Start a Postfix far end for each ``name: (address, tls)`` of ``far_ends``, all on
    ``port``, named ``hostname(name)``; close every one that was started when done."""
    started: dict[str, PostfixFarEnd] = {}
    try:
        for name, (address, tls) in far_ends.items():
            daemon = PostfixFarEnd(address, port, hostname=hostname(name), tls=tls, ca=ca)
            started[name] = daemon
            daemon.start()
        yield started
    finally:
        for daemon in started.values():
            daemon.close()


def rules_toml(rules: list[dict[str, str]]) -> str:
    blocks = []
    for rule in rules:
        lines = ["[[tls_policy.rules]]"] + [f'{key} = "{value}"' for key, value in rule.items()]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


class TlsRelay(SmgRelay):
    """``smg serve`` whose config also has ``[[tls_policy.rules]]``."""

    def __init__(
        self, tmp: Path, config: dict[str, dict[str, Any]], rules: list[dict[str, str]]
    ) -> None:
        super().__init__(tmp, config)
        self.rules = rules

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.config) + "\n" + rules_toml(self.rules))


def mail(sender: str, to: str, subject: str, mid: str) -> str:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{mid}@tls.test>\r\n"
        f"\r\nConfidential: for TLS only.\r\n"
    )


def send(relay: SmgRelay, sender: str, to: str, mid: str) -> str:
    """Send one message with swaks; return the queue id from the 250 reply."""
    result = swaks(relay.endpoint, to=to, mail_from=sender, data=mail(sender, to, mid, mid))
    assert result.ok, result.transcript
    return queued_as(result.transcript)


def with_mid(messages: list[ReceivedMessage], mid: str) -> list[ReceivedMessage]:
    return [m for m in messages if f"<{mid}@tls.test>" in m.raw.decode(errors="replace")]


def mail_from_logged(far_end: PostfixFarEnd, sender: str) -> bool:
    """Did the far end ever take a MAIL FROM:<sender>?  Postfix logs ``from=<sender>`` for
    every message it queued; a session that ended before MAIL logs no such line."""
    return f"from=<{sender}>" in far_end.log_text()


def queue_entry(relay: SmgRelay, queue_id: str, state: str, timeout: float = 20.0) -> Any:
    """Wait until ``queue_id`` is in ``state`` after at least one attempt; return it."""
    return wait_for(
        lambda: next(
            (
                m
                for m in relay.queued()
                if m.id == queue_id and m.state == state and m.attempts >= 1
            ),
            None,
        ),
        timeout,
        what=f"{queue_id} {state}\n{relay.log()}",
    )


def smg(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``smg ARGS`` (the real command line) and return its result."""
    return subprocess.run(
        [*SMG, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
