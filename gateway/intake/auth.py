"""SMTP AUTH (PLAIN, LOGIN) for tenants' hosts outside their networks (issue 11).

Offered only where a ``[[tenants]]`` entry has ``auth`` users, and only after STARTTLS
(aiosmtpd's ``auth_require_tls``: ``538 5.7.11`` before it, and EHLO lists AUTH only once
the session is encrypted).  A user's password is checked against its scrypt hash
(:mod:`gateway.passwords`) in a thread, so the tens of milliseconds it costs do not stall the
other sessions; an unknown user costs the same (a dummy hash), so the reply time does not
tell which users exist.  After :data:`MAX_FAILURES` failed logins the session is closed with
``421 4.7.0``.  A logged-in session is the user's customer (``GatewaySMTP.tenant``), whatever
network it came from.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
from base64 import b64decode
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult

from gateway.log import event
from gateway.passwords import hash_password, verify
from gateway.tenants import Tenant

log = logging.getLogger("smg.intake")

MAX_FAILURES = 3  # failed logins before the session is closed


@functools.cache
def _dummy_hash() -> str:
    """A hash to check unknown users against (same work as a real one)."""
    return hash_password("no such user")


class AuthCommands:
    """Mixin of ``GatewaySMTP``: AUTH against the handler's tenant table."""

    tenant: Tenant | None
    auth_user: str | None = None
    _auth_failures: int = 0
    handler: Any
    client_ip: str
    intake: Any
    counted: Tenant | None = None

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.handler.offers_auth:
            await self.push(  # type: ignore[attr-defined]
                "502 5.5.1 AUTH is not offered here: relay access is by client address"
            )
            return
        await SMTP.smtp_AUTH(self, arg)  # type: ignore[arg-type]

    def _count_session(self, tenant: Tenant) -> str | None:
        """A client from ``auth_networks`` has no customer at connect, so its session is
        counted against the customer's session limits when it logs in: the refusal (421) when
        the customer has no session left, else None.  A session already counted (a customer's
        network) stays counted once."""
        guard = getattr(self.intake, "guard", None)
        if guard is None or getattr(self, "counted", None) is not None:
            return None
        over = guard.at_connect(tenant, self.client_ip, self.config.gateway.hostname)  # type: ignore[attr-defined]
        if over is None:
            self.counted = tenant  # released when the session ends (Intake.session_ended)
        return over

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")  # type: ignore[attr-defined]
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Cannot decode base64")  # type: ignore[attr-defined]
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split the AUTH PLAIN value")  # type: ignore[attr-defined]
            return AuthResult(success=False, handled=True)
        return await self._login(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth("Username:")  # type: ignore[attr-defined]
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Cannot decode base64")  # type: ignore[attr-defined]
                return AuthResult(success=False, handled=True)
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth("Password:")  # type: ignore[attr-defined]
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._login(login, password)

    async def _login(self, login: bytes, password: bytes) -> AuthResult:
        user = login.decode("utf-8", "replace")
        found = self.handler.tenants.user(user)
        stored = found[1] if found is not None else _dummy_hash()
        good = await asyncio.to_thread(verify, password, stored)
        if good and found is not None:
            over = self._count_session(found[0])
            if over is not None:
                self.close_with(over)  # type: ignore[attr-defined]
                return AuthResult(success=False, handled=True)
            self.tenant, self.auth_user = found[0], user
            event(log, "auth", client=self.client_ip, user=user, tenant=found[0].name)
            return AuthResult(success=True, auth_data=user)
        self._auth_failures += 1
        self.intake.metrics.inc("rejected", stage="auth", reason="auth_failed")
        event(log, "reject", "NOQUEUE", stage="auth", client=self.client_ip, user=user,
              reason="auth_failed", failures=self._auth_failures)  # fmt: skip
        if self._auth_failures >= MAX_FAILURES:
            self.close_with("421 4.7.0 Too many failed logins, closing the connection")  # type: ignore[attr-defined]
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication failed")
