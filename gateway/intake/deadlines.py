"""Session and command deadlines and the junk-command limit (issue 11, like Postfix's
``smtpd_per_request_deadline`` and ``smtpd_junk_command_limit``).

- ``gateway.session_deadline``: the whole session; then ``421 4.4.2`` and close, even for a
  client that keeps sending valid commands (a slot is never held forever);
- ``gateway.command_deadline``: once the first byte of a command line came, the whole line
  must come within it (else ``421 4.4.2``), and in DATA each piece of up to 64 KiB must: a
  client trickling a byte a second is cut off well before ``idle_timeout``;
- ``gateway.max_junk_commands``: NOOP, RSET, VRFY and HELP beyond this many since the last
  queued message get ``421 4.7.0`` and the session is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.smtp import SMTP

from gateway.log import event

log = logging.getLogger("smg.intake")


class SessionDeadlines:
    """Mixin of ``GatewaySMTP``."""

    config: Any
    busy: bool
    client_ip: str
    hostname: str
    loop: asyncio.AbstractEventLoop
    junk = 0
    _line_started = False
    _session_timer: asyncio.TimerHandle | None = None

    def start_deadlines(self) -> None:
        seconds = self.config.gateway.session_deadline
        self._session_timer = self.loop.call_later(seconds, self._deadline, "session", seconds)

    def stop_deadlines(self) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
            self._session_timer = None

    def _deadline(self, which: str, seconds: float) -> None:
        event(log, "deadline", client=self.client_ip, which=which, seconds=f"{seconds:g}")
        self.close_with(  # type: ignore[attr-defined]
            f"421 4.4.2 {self.hostname} {which.capitalize()} deadline of {seconds:g} s reached,"
            " closing the connection"
        )

    def note_bytes(self) -> None:
        """Bytes of a command line came: the line has ``command_deadline`` to be complete."""
        if self.busy or self._line_started:
            return
        self._line_started = True
        gateway = self.config.gateway
        SMTP._reset_timeout(self, min(gateway.command_deadline, gateway.idle_timeout))  # type: ignore[arg-type]

    def _reset_timeout(self, duration: float | None = None) -> None:
        self._line_started = False  # a command was read (or DATA set its own)
        SMTP._reset_timeout(self, duration)  # type: ignore[arg-type]

    async def piece_in_time(self, read: Any) -> Any:
        """One piece of DATA within ``command_deadline``, else ``421 4.4.2`` and close."""
        seconds = self.config.gateway.command_deadline
        try:
            async with asyncio.timeout(seconds):
                return await read
        except TimeoutError:
            self._deadline("command", seconds)
            raise ConnectionResetError("DATA piece over the command deadline") from None

    async def _junk_over(self) -> bool:
        self.junk += 1
        limit = self.config.gateway.max_junk_commands
        if self.junk <= limit:
            return False
        event(log, "reject", "NOQUEUE", client=self.client_ip, reason="junk_commands",
              limit=limit)  # fmt: skip
        self.close_with(f"421 4.7.0 {self.hostname} Too many junk commands, closing")  # type: ignore[attr-defined]
        return True

    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._junk_over():
            await SMTP.smtp_NOOP(self, arg)  # type: ignore[arg-type]

    async def smtp_RSET(self, arg: str) -> None:
        if not await self._junk_over():
            await SMTP.smtp_RSET(self, arg)  # type: ignore[arg-type]

    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._junk_over():
            await SMTP.smtp_VRFY(self, arg)  # type: ignore[arg-type]

    async def smtp_HELP(self, arg: str) -> None:
        if not await self._junk_over():
            await SMTP.smtp_HELP(self, arg)  # type: ignore[arg-type]
