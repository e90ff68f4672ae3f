"""Lean SMTP sink and SMTP load client for the pipeline bench (each runs as its own process).

    python smtp_tools.py sink HOST PORT STATE_FILE
        Accepts every message (PIPELINING, no TLS); every 0.1 s writes
        "count signed first_arrival last_arrival" to STATE_FILE (signed: messages carrying a
        DKIM-Signature).  Stops on SIGTERM.

    python smtp_tools.py load HOST:PORT COUNT CONNECTIONS SIZE SEED
        Sends COUNT messages of about SIZE bytes over CONNECTIONS parallel sessions (one
        transaction after another per session); prints one JSON line: sent, failed, seconds,
        latency p50/p99 of the final reply, and a sample of failures.

Kept small and cheap on purpose: the machine has two cores, and both stacks in the bench pay
the same for the sink and the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from pathlib import Path

SENDER = "alice@bench-sender.test"
RECIPIENT = "bob@bench-far.test"
_WORDS = [
    *[
        "invoice",
        "quarterly",
        "figures",
        "meeting",
        "agenda",
        "budget",
        "review",
        "release",
        "schedule",
        "customer",
    ],
    *[
        "contract",
        "delivery",
        "project",
        "milestone",
        "team",
        "report",
        "summary",
        "proposal",
        "approval",
    ],
    *[
        "minutes",
        "timeline",
        "resources",
        "planning",
        "forecast",
        "revenue",
        "support",
        "ticket",
        "upgrade",
    ],
]

# --- the sink -------------------------------------------------------------------------------


class SinkProtocol(asyncio.Protocol):
    def __init__(self, stats: dict[str, float]) -> None:
        self.stats = stats
        self.buffer = b""
        self.in_data = False
        self.data = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 sink.bench ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, chunk: bytes) -> None:
        self.buffer += chunk
        replies = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    if len(self.buffer) > 5:
                        self.data += self.buffer[:-5]
                        self.buffer = self.buffer[-5:]
                    break
                self.data += self.buffer[: end + 2]
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self._message_done()
                replies.append(b"250 2.0.0 Ok: stored\r\n")
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                break
            line, self.buffer = self.buffer[:line_end], self.buffer[line_end + 2 :]
            reply = self._command(line)
            if reply:
                replies.append(reply)
        if replies:
            self.transport.write(b"".join(replies))  # type: ignore[attr-defined]

    def _command(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n"
        if verb == b"DATA":
            self.in_data = True
            self.data = bytearray()
            return b"354 go ahead\r\n"
        if verb == b"QUIT":
            self.transport.write(b"221 bye\r\n")  # type: ignore[attr-defined]
            self.transport.close()
            return b""
        return b"250 Ok\r\n"

    def _message_done(self) -> None:
        now = time.time()
        self.stats["count"] += 1
        if b"DKIM-Signature:" in self.data[:20000]:
            self.stats["signed"] += 1
        if not self.stats["first"]:
            self.stats["first"] = now
        self.stats["last"] = now


async def sink(host: str, port: int, state_file: Path) -> None:
    stats = {"count": 0, "signed": 0, "first": 0.0, "last": 0.0}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(stats), host, port, backlog=256)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        while not stop.is_set():
            line = f"{stats['count']} {stats['signed']} {stats['first']:.6f} {stats['last']:.6f}"
            state_file.write_text(line + "\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


# --- the load -------------------------------------------------------------------------------


def make_message(index: int, size: int, rng: random.Random) -> bytes:
    head = (
        f"From: Alice Example <{SENDER}>\r\nTo: Bob Example <{RECIPIENT}>\r\n"
        f"Subject: {rng.choice(_WORDS).title()} {rng.choice(_WORDS)} #{index}\r\n"
        f"Date: Mon, 01 Jan 2024 10:{index % 60:02d}:00 +0000\r\n"
        f"Message-ID: <bench-{index}-{rng.randrange(1 << 30)}@bench-sender.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello Bob,\r\n\r\n"
    )
    lines = []
    total = len(head)
    while total < size - 40:
        line = " ".join(rng.choice(_WORDS) for _ in range(11)).capitalize() + "."
        lines.append(line)
        total += len(line) + 2
    return (head + "\r\n".join(lines) + "\r\n\r\nKind regards,\r\nAlice\r\n").encode()


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def _session(host: str, port: int, messages: list[bytes], latencies: list[float],
                   failures: list[str]) -> None:  # fmt: skip
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _reply(reader)
        writer.write(b"EHLO load.bench\r\n")
        await _reply(reader)
        for data in messages:
            started = time.perf_counter()
            for command in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>", "DATA"):
                writer.write(command.encode() + b"\r\n")
                reply = await _reply(reader)
                if reply[:1] not in (b"2", b"3"):
                    break
            else:
                writer.write(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
                reply = await _reply(reader)
            latencies.append(time.perf_counter() - started)
            if not reply.startswith(b"250"):
                failures.append(reply.decode(errors="replace").strip())
                writer.write(b"RSET\r\n")
                await _reply(reader)
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


async def load(target: str, count: int, connections: int, size: int, seed: int) -> dict:
    host, port = target.rsplit(":", 1)
    rng = random.Random(seed)
    messages = [make_message(seed * 1_000_000 + i, size, rng) for i in range(count)]
    latencies: list[float] = []
    failures: list[str] = []
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _session(host, int(port), messages[i::connections], latencies, failures)
            for i in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "sent": count - len(failures),
        "failed": len(failures),
        "seconds": elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "failures": failures[:5],
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["sink"]:
        asyncio.run(sink(argv[1], int(argv[2]), Path(argv[3])))
        return 0
    if argv[:1] == ["load"]:
        target, count, conns, size, seed = argv[1], *map(int, argv[2:6])
        print(json.dumps(asyncio.run(load(target, count, conns, size, seed))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
