"""A fast in-process SMTP sink (aiosmtpd in a background thread) that records everything."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from .ca import LeafCert
from .util import free_port, wait_for


@dataclass(frozen=True)
class SinkMessage:
    peer: tuple[str, int]  # the client's (ip, port)
    helo: str | None
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # exactly as received (after dot-unstuffing), CRLF line endings
    tls: bool  # the session had done STARTTLS


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.sink.reject_recipients.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
        message = SinkMessage(
            peer=(str(peer[0]), int(peer[1])),
            helo=session.host_name,
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
            tls=session.ssl is not None,
        )
        self.sink._record(message)
        return self.sink.data_reply


class SmtpSink:
    """aiosmtpd sink on `address`:`port` (free port if None).

    tls_cert: offer STARTTLS with this certificate (from TestCA); require_tls: refuse mail
    before STARTTLS. reject_recipients: {address: "550 5.1.1 no"} (lower-case keys).
    data_reply: the reply to DATA (e.g. "451 4.3.0 try later" to defer every message).
    """

    def __init__(
        self,
        address: str = "127.0.0.1",
        port: int | None = None,
        tls_cert: LeafCert | None = None,
        require_tls: bool = False,
        reject_recipients: dict[str, str] | None = None,
        data_reply: str = "250 2.0.0 OK queued",
        hostname: str = "sink.test",
    ) -> None:
        self.address = address
        self.port = port
        self.tls_cert = tls_cert
        self.require_tls = require_tls
        self.reject_recipients = {k.lower(): v for k, v in (reject_recipients or {}).items()}
        self.data_reply = data_reply
        self.hostname = hostname
        self._messages: list[SinkMessage] = []
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def messages(self) -> list[SinkMessage]:
        with self._lock:
            return list(self._messages)

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        return wait_for(
            lambda: (msgs := self.messages) and len(msgs) >= count and msgs,
            timeout,
            what=f"{count} message(s) at sink {self.endpoint}",
        )

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def _record(self, message: SinkMessage) -> None:
        with self._lock:
            self._messages.append(message)

    def start(self) -> None:
        if self._controller is not None:
            return
        if self.port is None:
            self.port = free_port(self.address)
        kwargs: dict[str, Any] = {"server_hostname": self.hostname, "ident": "SMG test sink"}
        if self.tls_cert is not None:
            kwargs["tls_context"] = self.tls_cert.server_context()
            kwargs["require_starttls"] = self.require_tls
        controller = Controller(
            _Handler(self), hostname=self.address, port=self.port, ready_timeout=10, **kwargs
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    close = stop

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
