"""A TCP proxy that hides STARTTLS: a man in the middle downgrading SMTP to plaintext."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading

from .util import HarnessError, free_port

_STARTTLS_CAPABILITY = re.compile(rb"^250[ -]STARTTLS\s*$", re.IGNORECASE)
_STARTTLS_COMMAND = re.compile(rb"^STARTTLS\s*$", re.IGNORECASE)
_MAIL_COMMAND = re.compile(rb"^MAIL FROM:", re.IGNORECASE)
_REFUSAL = b"502 5.5.1 STARTTLS not available\r\n"
_LINE_LIMIT = 1 << 20


class StartTLSStripProxy:
    """Listen on `listen` ("ip:port" or (ip, port); port 0/None = free port) and pass every
    connection to `upstream`, except: the STARTTLS line is removed from EHLO replies and a
    STARTTLS command is answered "502" without reaching the server. After MAIL FROM the
    client's bytes are passed through untouched (message data is never parsed).
    Runs its own asyncio loop in a background thread; `connections` counts accepted clients.
    """

    def __init__(self, listen: str | tuple[str, int], upstream: str | tuple[str, int]) -> None:
        self.listen_host, port = _split(listen)
        self.listen_port = port or free_port(self.listen_host)
        self.upstream = _split(upstream)
        self.connections = 0
        self.stripped = 0  # EHLO replies from which STARTTLS was removed
        self.refused = 0  # STARTTLS commands answered with 502
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    def start(self) -> None:
        if self._thread is not None:
            return
        started = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._handle, self.listen_host, self.listen_port, limit=_LINE_LIMIT
                    )
                )
            except OSError as exc:
                error.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="starttls-strip-proxy", daemon=True)
        self._thread.start()
        if not started.wait(10) or error:
            self._thread = None
            raise HarnessError(f"proxy could not listen on {self.endpoint}: {error}")

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        self._thread.join(timeout=10)
        self._thread = None

    close = stop

    def __enter__(self) -> StartTLSStripProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- per connection -----------------------------------------------------------------------
    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream, limit=_LINE_LIMIT), timeout=10
            )
        except (OSError, TimeoutError):
            client_w.close()
            return
        try:
            await asyncio.gather(
                self._server_to_client(server_r, client_w),
                self._client_to_server(client_r, server_w, client_w),
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            for writer in (client_w, server_w):
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()

    async def _server_to_client(
        self, server_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        reply: list[bytes] = []
        while line := await server_r.readline():
            reply.append(line)
            if len(line) >= 4 and line[3:4] == b"-":
                continue  # more lines of a multi-line reply follow
            client_w.write(b"".join(self._strip_starttls(reply)))
            await client_w.drain()
            reply = []
        if reply:
            client_w.write(b"".join(reply))
        client_w.close()

    def _strip_starttls(self, reply: list[bytes]) -> list[bytes]:
        kept = [line for line in reply if not _STARTTLS_CAPABILITY.match(line)]
        if len(kept) == len(reply):
            return reply
        self.stripped += 1
        last = kept[-1]
        kept[-1] = last[:3] + b" " + last[4:]  # the new last line ends the reply
        return kept

    async def _client_to_server(
        self,
        client_r: asyncio.StreamReader,
        server_w: asyncio.StreamWriter,
        client_w: asyncio.StreamWriter,
    ) -> None:
        # Command phase: line by line, until the first MAIL FROM.
        while line := await client_r.readline():
            if _STARTTLS_COMMAND.match(line):
                self.refused += 1
                client_w.write(_REFUSAL)
                await client_w.drain()
                continue
            server_w.write(line)
            await server_w.drain()
            if _MAIL_COMMAND.match(line):
                break
        else:
            server_w.close()
            return
        # Transaction phase: plain byte copy.
        while chunk := await client_r.read(65536):
            server_w.write(chunk)
            await server_w.drain()
        server_w.close()


def _split(endpoint: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(endpoint, tuple):
        return endpoint[0], int(endpoint[1] or 0)
    host, _, port = endpoint.rpartition(":")
    return host, int(port or 0)
