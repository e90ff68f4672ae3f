"""Wrapper around the Debian swaks binary (the SMTP Swiss Army Knife)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SwaksResult:
    returncode: int  # 0 = message accepted; see swaks(1) for the others
    transcript: str  # the whole SMTP conversation (stdout + stderr)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def swaks(
    server: str,
    to: str | Sequence[str] = "bob@example.net",
    mail_from: str = "alice@example.com",
    *,
    ehlo: str = "client.example.com",
    tls: bool | str = False,
    local_address: str | None = None,
    data: str | bytes | None = None,
    headers: dict[str, str] | None = None,
    body: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> SwaksResult:
    """Send one message with swaks to `server` ("host:port").

    tls: False (plain), True (STARTTLS required: --tls), "optional" (--tls-optional),
    "on-connect" (implicit TLS). `data` replaces the whole DATA part (headers + body).
    mail_from "" sends the null sender (MAIL FROM:<>).
    """
    cmd = ["swaks", "--server", server, "--from", mail_from or "<>", "--ehlo", ehlo]
    cmd += ["--to", to if isinstance(to, str) else ",".join(to)]
    cmd += ["--timeout", str(max(1, int(timeout) - 2))]
    if tls is True:
        cmd.append("--tls")
    elif tls == "optional":
        cmd.append("--tls-optional")
    elif tls == "on-connect":
        cmd.append("--tls-on-connect")
    elif tls is not False:
        raise ValueError(f"tls must be False, True, 'optional' or 'on-connect', not {tls!r}")
    if local_address:
        cmd += ["--local-interface", local_address]
    for name, value in (headers or {}).items():
        cmd += ["--add-header", f"{name}: {value}"]
    if body is not None:
        cmd += ["--body", body]
    stdin: bytes | None = None
    if data is not None:
        cmd += ["--data", "-"]
        stdin = data.encode() if isinstance(data, str) else data
    cmd += list(extra_args)
    proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, check=False)
    transcript = (proc.stdout + proc.stderr).decode(errors="replace")
    return SwaksResult(proc.returncode, transcript)
