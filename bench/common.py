"""Lean SMTP sink and load client shared by the benches, each run as its own process.

    python -m bench.common sink HOST PORT STATE_FILE [signed]
        Accepts every message (PIPELINING, no TLS).  Every 0.1 s writes
        "count first_arrival last_arrival" to STATE_FILE, with "signed" as
        "count signed first_arrival last_arrival" (signed: messages with a DKIM-Signature in
        their first 20000 bytes).  Stops on SIGTERM.

    python -m bench.common load HOST:PORT COUNT CONNECTIONS SIZE SEED [SOURCE_IP|-] [RCPT]
        Sends COUNT messages of about SIZE bytes over CONNECTIONS sessions (one transaction
        after another per session; MAIL, RCPT and DATA in one write when the server offers
        PIPELINING, as real senders' MTAs do), to RCPT (default bob@bench-far.test).
        Prints one JSON line: sent, failed, seconds, p50/p99 of the time from MAIL FROM to
        the final 250 (ms), a sample of failures.

Both are plain asyncio protocol code without any SMTP library: the machine has two cores, and
the sink and the load must cost as little as possible and the same for every stack measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SENDER = "alice@bench-sender.test"
RECIPIENT = "bob@bench-far.test"
_WORDS = [
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
    "contract",
    "delivery",
    "project",
    "milestone",
    "team",
    "report",
    "summary",
    "proposal",
    "approval",
    "minutes",
    "timeline",
    "resources",
    "planning",
    "forecast",
    "revenue",
    "support",
    "ticket",
    "upgrade",
]


SIGNED_LOOKS_AT = 20000  # bytes of each message searched for a DKIM-Signature


class SinkProtocol(asyncio.Protocol):
    """Just enough SMTP to accept mail; counts messages (and, if asked, signed ones)."""

    def __init__(self, stats: dict[str, float], count_signed: bool = False) -> None:
        self.stats = stats
        self.count_signed = count_signed
        self.buffer = b""
        self.in_data = False
        self.head: bytearray | None = None  # the message's first bytes, when counting signed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 sink.bench ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        self.buffer += chunk
        replies: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    self._keep(self.buffer[:-4])
                    self.buffer = self.buffer[-4:]  # keep what may start the end marker
                    break
                self._keep(self.buffer[:end])
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
            self.transport.write(b"".join(replies))

    def _command(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            return b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n"
        if verb == b"DATA":
            self.in_data = True
            self.head = bytearray() if self.count_signed else None
            self.buffer = b"\r\n" + self.buffer  # so an empty body still ends at \r\n.\r\n
            return b"354 go ahead\r\n"
        if verb == b"QUIT":
            self.transport.write(b"221 bye\r\n")
            self.transport.close()
            return b""
        return b"250 Ok\r\n"

    def _keep(self, data: bytes) -> None:
        if self.head is not None and len(self.head) < SIGNED_LOOKS_AT:
            self.head += data[: SIGNED_LOOKS_AT - len(self.head)]

    def _message_done(self) -> None:
        now = time.time()
        self.stats["count"] += 1
        if self.head is not None and b"DKIM-Signature:" in self.head:
            self.stats["signed"] += 1
        if not self.stats["first"]:
            self.stats["first"] = now
        self.stats["last"] = now


async def sink(host: str, port: int, state_file: Path, count_signed: bool = False) -> None:
    stats = {"count": 0, "signed": 0, "first": 0.0, "last": 0.0}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkProtocol(stats, count_signed), host, port, backlog=512
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        while not stop.is_set():
            tmp = state_file.with_suffix(".tmp")
            signed = f" {stats['signed']}" if count_signed else ""
            times = f"{stats['first']:.6f} {stats['last']:.6f}"
            tmp.write_text(f"{stats['count']}{signed} {times}\n")
            tmp.replace(state_file)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


def make_message(index: int, size: int, rng: random.Random) -> bytes:
    """A plain business-like text message of about ``size`` bytes."""
    head = (
        f"From: Alice Example <{SENDER}>\r\nTo: Bob Example <{RECIPIENT}>\r\n"
        f"Subject: {rng.choice(_WORDS).title()} {rng.choice(_WORDS)} #{index}\r\n"
        f"Date: Mon, 01 Jan 2024 10:{index % 60:02d}:00 +0000\r\n"
        f"Message-ID: <bench-{index}-{rng.randrange(1 << 30)}@bench-sender.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello Bob,\r\n\r\n"
    )
    lines, total = [], len(head)
    while total < size - 40:
        line = " ".join(rng.choice(_WORDS) for _ in range(11)).capitalize() + "."
        lines.append(line)
        total += len(line) + 2
    return (head + "\r\n".join(lines) + "\r\n\r\nKind regards,\r\nAlice\r\n").encode()


class _Replies:
    """SMTP replies read from the socket in large pieces: one ``read`` serves every reply a
    pipelined write brought back, not one ``readline`` per line (the load's CPU counts)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = b""

    async def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk
        line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
        return line

    async def next(self) -> bytes:
        """The next whole reply's last line (the one whose code is followed by a space)."""
        while (line := await self._line())[3:4] == b"-":
            pass
        return line

    async def offers(self, keyword: bytes) -> bool:
        """Read an EHLO reply whole; whether one of its lines offers ``keyword``."""
        offered = False
        while True:
            line = await self._line()
            offered = offered or line[4:].split(b" ")[0].upper() == keyword
            if line[3:4] != b"-":
                return offered


async def _transaction(
    writer: asyncio.StreamWriter, replies: _Replies, envelope: bytes, body: bytes, pipelined: bool
) -> bytes:
    """MAIL, RCPT, DATA and the message; the reply that ended it. With PIPELINING (as real
    senders' MTAs use it) the three commands go in one write (RFC 2920), else one by one."""
    commands = envelope.split(b"\r\n")[:-1]
    if pipelined:
        writer.write(envelope)
        answers = [await replies.next() for _ in commands]
    else:
        answers = []
        for command in commands:
            writer.write(command + b"\r\n")
            answers.append(await replies.next())
            if answers[-1][:1] not in (b"2", b"3"):
                break
    refused = [a for a in answers if a[:1] not in (b"2", b"3")]
    if refused:
        return refused[0]
    writer.write(body)
    return await replies.next()


async def _session(
    host: str,
    port: int,
    source: str | None,
    messages: list[bytes],
    latencies: list[float],
    failures: list[str],
    rcpt: str = RECIPIENT,
) -> None:
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection(host, port, local_addr=local)
    replies = _Replies(reader)
    envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
    try:
        await replies.next()
        writer.write(b"EHLO load.bench\r\n")
        pipelined = await replies.offers(b"PIPELINING")
        for body in messages:
            started = time.perf_counter()
            reply = await _transaction(writer, replies, envelope, body, pipelined)
            latencies.append(time.perf_counter() - started)
            if not reply.startswith(b"250"):
                failures.append(reply.decode(errors="replace").strip())
                writer.write(b"RSET\r\n")
                await replies.next()
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


def _dot_stuffed(message: bytes) -> bytes:
    """The message as DATA sends it: leading dots doubled, the end marker added (done before
    the clock starts, so the load's CPU during the measurement is the SMTP alone)."""
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


async def load(
    target: str,
    count: int,
    connections: int,
    size: int,
    seed: int,
    source: str | None,
    rcpt: str = RECIPIENT,
) -> dict[str, object]:
    host, port = target.rsplit(":", 1)
    rng = random.Random(seed)
    messages = [_dot_stuffed(make_message(seed * 1_000_000 + i, size, rng)) for i in range(count)]
    latencies: list[float] = []
    failures: list[str] = []
    cpu_started = _own_cpu()
    started = time.perf_counter()
    wall_started = time.time()
    results = await asyncio.gather(
        *(
            _session(host, int(port), source, messages[i::connections], latencies, failures, rcpt)
            for i in range(connections)
        ),
        return_exceptions=True,
    )
    elapsed = time.perf_counter() - started
    cpu = _own_cpu() - cpu_started
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    latencies.sort()
    n = len(latencies) or 1
    return {
        "sent": len(latencies) - len(failures),
        "failed": len(failures) + (count - len(latencies)),
        "started": wall_started,
        "seconds": elapsed,
        "cpu_s": cpu,
        "p50_ms": 1000 * latencies[n // 2] if latencies else None,
        "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if latencies else None,
        "failures": (failures + errors)[:5],
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_load(
    endpoint: str,
    count: int,
    connections: int,
    size: int,
    seed: int,
    rcpt: str = RECIPIENT,
    timeout: float = 1800,
) -> dict[str, Any]:
    """One load run in a process of its own; what it printed.  Its ``cpu_s`` is the load's
    CPU while sending only (its start-up and the making of the messages come before, while
    nothing is measured), so the benches count what competed with the MTA for the cores."""
    out = subprocess.run(
        [sys.executable, __file__, "load", endpoint, str(count), str(min(connections, count)),
         str(size), str(seed), "-", rcpt],
        capture_output=True, text=True, timeout=timeout, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def main(argv: list[str]) -> int:
    if argv[:1] == ["sink"]:
        asyncio.run(sink(argv[1], int(argv[2]), Path(argv[3]), argv[4:5] == ["signed"]))
        return 0
    if argv[:1] == ["load"]:
        target, count, conns, size, seed = argv[1], *map(int, argv[2:6])
        source = argv[6] if len(argv) > 6 and argv[6] != "-" else None
        rcpt = argv[7] if len(argv) > 7 else RECIPIENT
        print(json.dumps(asyncio.run(load(target, count, conns, size, seed, source, rcpt))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- process accounting ---------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float, int]]:
    """pid -> (ppid, CPU seconds incl. reaped children, RSS bytes)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = sum(int(x) for x in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
        table[int(entry)] = (int(fields[1]), cpu, int(fields[21]) * PAGE)
    return table


def tree(root: int, pss: bool = False) -> tuple[float, int, int]:
    """CPU seconds, RSS bytes and (if asked) PSS bytes of ``root`` and its live descendants.
    PSS shares each shared page among the processes mapping it: the fair sum for a
    multi-process MTA, where RSS counts the same library pages in every process."""
    table = _proc_table()
    cpu = rss = proportional = 0
    todo, seen = [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        cpu += table[pid][1]
        rss += table[pid][2]
        if pss:
            proportional += _pss(pid)
        todo += [child for child, (ppid, _, _) in table.items() if ppid == pid]
    return cpu, rss, proportional


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
