"""The customer's own mail server: receives what the fleet sends back to the customer (NDRs,
virus information mails) on the customer host (``mail.customer-a.example`` = the MX of
customer-a.example and the implicit MX of customer-b.example, 198.51.100.30:25).

The lab's customer host is only a network namespace with nothing listening, so an NDR for a
customer sender would wait in the gateways' queues. This sink takes every message (any
recipient) and stores one file per recipient in a Maildir, with the same headers the lab's
far ends write (``Return-Path:``, ``X-Original-To:``, a ``Received:`` naming the client), so
``bench.fleet.arrivals`` reads both alike.

    ip netns exec smglab-customer .venv/bin/python -m bench.fleet.sink \\
        --listen 198.51.100.30:25 --maildir DIR [--max-seconds 14400]

``CustomerMailServer`` starts it (in the namespace, PID kept in a file) and stops it by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.fleet.smtp import banner_from

DEFAULT_MAX_SECONDS = 4 * 3600  # stops by itself if nobody stops it
_counter = itertools.count()


class MaildirHandler:
    def __init__(self, maildir: Path, hostname: str) -> None:
        self.maildir, self.hostname = maildir, hostname
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server, session, envelope) -> str:
        peer = session.peer[0] if session.peer else "unknown"
        stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
        for rcpt in envelope.rcpt_tos:
            head = (
                f"Return-Path: <{envelope.mail_from}>\r\nX-Original-To: {rcpt}\r\n"
                f"Received: from {session.host_name} (unknown [{peer}])\r\n"
                f"\tby {self.hostname} (smg-acceptance sink) for <{rcpt}>; {stamp}\r\n"
            )
            self._store(head.encode() + envelope.original_content)
        return "250 2.0.0 Ok: stored"

    def _store(self, data: bytes) -> None:
        name = f"{time.time_ns()}.{os.getpid()}.{next(_counter)}.sink"
        tmp = self.maildir / "tmp" / name
        tmp.write_bytes(data)
        os.rename(tmp, self.maildir / "new" / name)


async def serve(listen: str, maildir: Path, hostname: str, max_seconds: float) -> None:
    from aiosmtpd.smtp import SMTP

    host, port = listen.rsplit(":", 1)
    handler = MaildirHandler(maildir, hostname)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=hostname, data_size_limit=60 * 1024 * 1024),
        host=host,
        port=int(port),
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet.sink", description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--maildir", required=True, type=Path)
    parser.add_argument("--hostname", default="mail.customer-a.example")
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.maildir, args.hostname, args.max_seconds))
    return 0


class CustomerMailServer:
    """The sink as a daemon in the customer namespace; ``maildir`` is where mail lands."""

    def __init__(self, netns: str, address: str, workdir: Path, port: int = 25) -> None:
        self.netns, self.address, self.port = netns, address, port
        self.workdir = workdir
        self.maildir = workdir / "maildir"
        self.pid_file = workdir / "sink.pid"
        self.log_file = workdir / "sink.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        argv = [
            "ip", "netns", "exec", self.netns, sys.executable, "-m", "bench.fleet.sink",
            "--listen", f"{self.address}:{self.port}", "--maildir", str(self.maildir),
        ]  # fmt: skip
        repo = Path(__file__).resolve().parents[2]
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=repo, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.pid_file.write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the customer sink exited: {self.log_tail()}")
            if banner_from(self.netns, self.address, self.port, timeout=1).startswith("220"):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the customer sink did not answer in {timeout} s: {self.log_tail()}")

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self.pid_file.unlink(missing_ok=True)

    def _stop_leftover(self) -> None:
        """A sink of an earlier run that was killed before its teardown: end it by its PID,
        only if that PID still runs our sink (a reused PID is left alone)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return
        if b"bench.fleet.sink" not in cmdline:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


if __name__ == "__main__":
    sys.exit(main())
