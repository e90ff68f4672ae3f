"""clamd started by hand on a test signature database that detects EICAR."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from .util import DATA_DIR, Daemon, free_port

CLAMAV_TEST_DB = DATA_DIR / "clamav"
# Built from two halves so the repository itself does not look infected to a scanner.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# Every signature in tests/data/clamav starts with this; clamd appends ".UNOFFICIAL".
EICAR_SIGNATURE_PREFIX = "SMG-Test.EICAR"


class Clamd(Daemon):
    """clamd in the foreground with a unix socket in its temp dir and a TCP socket.

    Ports are chosen on the first start and kept, so `stop()` then `start()` mid-test brings
    it back on the same addresses (for the relay's "clamd down" tests).
    """

    name = "clamd"

    def __init__(
        self,
        database_dir: Path = CLAMAV_TEST_DB,
        stream_max_length: str = "10M",
        tcp_host: str = "127.0.0.1",
        extra_config: dict[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.database_dir = Path(database_dir)
        self.stream_max_length = stream_max_length
        self.tcp_host = tcp_host
        self.tcp_port: int | None = None
        self.extra_config = extra_config or {}
        self.socket_path = self.dir / "clamd.sock"
        self.config_path = self.dir / "clamd.conf"
        self.pid_path = self.dir / "clamd.pid"

    @property
    def tcp_address(self) -> tuple[str, int]:
        assert self.tcp_port is not None, "start() first"
        return (self.tcp_host, self.tcp_port)

    @property
    def tcp(self) -> str:
        """The TCP socket as "host:port"."""
        host, port = self.tcp_address
        return f"{host}:{port}"

    def _forget_ports(self) -> None:
        self.tcp_port = None

    def _prepare(self) -> None:
        if self.tcp_port is None:
            self.tcp_port = free_port(self.tcp_host)
        settings = {
            "Foreground": "yes",
            "LocalSocket": str(self.socket_path),
            "TCPSocket": str(self.tcp_port),
            "TCPAddr": self.tcp_host,
            "DatabaseDirectory": str(self.database_dir),
            "PidFile": str(self.pid_path),
            "LogFile": str(self.log_path),
            "LogTime": "yes",
            "StreamMaxLength": self.stream_max_length,
            # Few threads: the machine is small and shared by parallel test runs.
            "MaxThreads": "4",
            "SelfCheck": "3600",
            **self.extra_config,
        }
        lines = [f"{key} {value}" for key, value in settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return ["clamd", "-c", str(self.config_path)]

    def _ready(self) -> bool:
        return self.ping()

    def command(self, cmd: bytes, timeout: float = 2.0) -> bytes:
        """Send a null-terminated clamd command over the unix socket, return the reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(b"z" + cmd + b"\0")
            return _read_reply(sock)

    def ping(self) -> bool:
        try:
            return self.command(b"PING", timeout=0.5) == b"PONG"
        except OSError:
            return False

    def instream(self, data: bytes, tcp: bool = False, chunk: int = 65536) -> str:
        """Scan `data` with INSTREAM (unix socket, or TCP when `tcp`); return the reply text,
        e.g. "stream: OK" or "stream: SMG-Test.EICAR.Body.UNOFFICIAL FOUND"."""
        family = socket.AF_INET if tcp else socket.AF_UNIX
        target = self.tcp_address if tcp else str(self.socket_path)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(target)
            sock.sendall(b"zINSTREAM\0")
            try:
                for start in range(0, len(data), chunk):
                    part = data[start : start + chunk]
                    sock.sendall(struct.pack(">I", len(part)) + part)
                sock.sendall(struct.pack(">I", 0))
            except (BrokenPipeError, ConnectionResetError):
                # clamd answers "size limit exceeded" and closes as soon as a chunk passes
                # StreamMaxLength, which can be before the rest is sent: its reply is read.
                pass
            return _read_reply(sock).decode(errors="replace")


def _read_reply(sock: socket.socket) -> bytes:
    """Read a null-terminated reply (bounded to 64 KiB)."""
    reply = b""
    while b"\0" not in reply and len(reply) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply.split(b"\0", 1)[0].strip()
