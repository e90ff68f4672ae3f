"""rspamd 3.4 run by hand on loopback, without touching /etc/rspamd/local.d or systemd.

The Debian rules in /etc/rspamd are used as they are; this instance's own local.d/override.d
(LOCAL_CONFDIR), DBDIR, RUNDIR and LOGDIR live in its temp dir. The compiled hyperscan cache
(.hs/.hsmp/.hsmc files, about 47 MB) is kept under CACHE_DIR/rspamd-<version>: a cold start
compiles for ~15-25 s, a warm start copies the cache in and is ready in about 1 s.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from .util import CACHE_DIR, Daemon, HarnessError, free_port, tcp_connectable, wait_for

RSPAMD_USER = "_rspamd"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
_HS_SUFFIXES = (".hs", ".hsmp", ".hsmc")
# Written by the hs_helper when it had to compile (cold cache).
_COMPILED_MARK = "rspamd_rs_compile_cb: compiled"
_HS_LOADED_MARK = "loading hyperscan expressions after receiving compilation notice"


class Rspamd(Daemon):
    """rspamd with a normal worker (`url`) and a controller (`controller_url`) on free ports.

    `nameserver` ("ip:port") is where rspamd sends DNS queries; by default a loopback port
    nobody listens on, so lookups fail at once (ICMP port unreachable) instead of hanging.
    `local_d` / `override_d` add files ({name: content}) to its local.d / override.d.
    """

    name = "rspamd"
    start_timeout = 120.0  # cold start on a busy 2-core machine

    def __init__(
        self,
        nameserver: str | None = None,
        workers: int = 1,
        host: str = "127.0.0.1",
        local_d: dict[str, str] | None = None,
        override_d: dict[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.host = host
        self.workers = workers
        self.nameserver = nameserver
        self.port: int | None = None
        self.controller_port: int | None = None
        self.local_d = local_d or {}
        self.override_d = override_d or {}
        self.confdir = self.dir / "conf"
        self.dbdir = self.dir / "db"
        self.rundir = self.dir / "run"
        self.logdir = self.dir / "log"
        self.log_path = self.logdir / "rspamd.log"
        self.cache_dir = CACHE_DIR / f"rspamd-{_rspamd_version()}"
        self._was_cold = False

    # -- public API ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the normal (scanning) worker, e.g. http://127.0.0.1:41333."""
        return f"http://{self.host}:{self.port}"

    @property
    def controller_url(self) -> str:
        return f"http://{self.host}:{self.controller_port}"

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None, "start() first"
        return (self.host, self.port)

    def check(
        self,
        message: bytes,
        ip: str = "127.0.0.2",
        mail_from: str = "alice@example.com",
        rcpts: tuple[str, ...] = ("bob@example.net",),
        helo: str = "client.example.com",
        user: str | None = "alice",
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """POST /checkv2 (headers IP, From, Rcpt (one per recipient), Helo, User); return the
        JSON reply: {"action": ..., "score": ..., "required_score": ..., "symbols": {...}}."""
        assert self.port is not None, "start() first"
        headers = [("IP", ip), ("From", mail_from), ("Helo", helo)]
        headers += [("Rcpt", rcpt) for rcpt in rcpts]
        if user:
            headers.append(("User", user))
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.putrequest("POST", "/checkv2")
            for name, value in headers:
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(message)))
            conn.endheaders(message)
            reply = conn.getresponse()
            body = reply.read()
        finally:
            conn.close()
        if reply.status != 200:
            raise HarnessError(f"rspamd /checkv2 answered {reply.status}: {body[:500]!r}")
        return json.loads(body)

    # -- Daemon hooks -------------------------------------------------------------------------
    def _forget_ports(self) -> None:
        self.port = self.controller_port = None

    def _prepare(self) -> None:
        if self.port is None:
            self.port = free_port(self.host)
            self.controller_port = free_port(self.host)
        uid, gid = _rspamd_ids()
        self.dir.chmod(0o755)  # the workers run as _rspamd and must reach db/run/log
        for path in (self.dbdir, self.rundir, self.logdir):
            path.mkdir(exist_ok=True)
            os.chown(path, uid, gid)
        self._write_config()
        self._was_cold = not self._restore_cache(uid, gid)

    def _write_config(self) -> None:
        nameserver = self.nameserver or f"127.0.0.1:{free_port('127.0.0.1')}"
        files = {
            "local.d/worker-normal.inc": (
                f'bind_socket = "{self.host}:{self.port}";\ncount = {self.workers};\n'
            ),
            "local.d/worker-controller.inc": (
                f'bind_socket = "{self.host}:{self.controller_port}";\ncount = 1;\n'
            ),
            "local.d/options.inc": (
                f'dns {{\n  nameserver = ["{nameserver}"];\n  timeout = 1s;\n'
                "  retransmits = 2;\n}\n"
            ),
            "local.d/fuzzy_check.conf": "enabled = false;\n",
            "local.d/logging.inc": 'level = "info";\n',
            "override.d/worker-proxy.inc": "count = -1;\n",
            **{f"local.d/{name}": text for name, text in self.local_d.items()},
            **{f"override.d/{name}": text for name, text in self.override_d.items()},
        }
        for relative, text in files.items():
            path = self.confdir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def _command(self) -> list[str]:
        return [
            "rspamd", "-f", "-u", RSPAMD_USER, "-g", RSPAMD_USER,
            "-c", "/etc/rspamd/rspamd.conf",
            f"--var=LOCAL_CONFDIR={self.confdir}",
            f"--var=DBDIR={self.dbdir}",
            f"--var=RUNDIR={self.rundir}",
            f"--var=LOGDIR={self.logdir}",
        ]  # fmt: skip

    def _ready(self) -> bool:
        assert self.port is not None and self.controller_port is not None
        for base, port in ((self.url, self.port), (self.controller_url, self.controller_port)):
            if not tcp_connectable(self.host, port) or _get(f"{base}/ping") != b"pong":
                return False
        return True

    def start(self) -> None:
        super().start()
        if self._was_cold:
            # Let the hs_helper finish compiling, then keep its work for the next runs.
            wait_for(
                lambda: _HS_LOADED_MARK in self.log_text(),
                timeout=90,
                interval=0.25,
                what="rspamd hyperscan compilation",
            )
            self._save_cache()

    def stop(self) -> None:
        if self.running and _COMPILED_MARK in self.log_text():
            self._save_cache()
        super().stop()

    # -- hyperscan cache ------------------------------------------------------------------------
    def _restore_cache(self, uid: int, gid: int) -> bool:
        """Copy cached hyperscan files into DBDIR; True if there was a cache to copy."""
        if not self.cache_dir.is_dir():
            return False
        copied = 0
        for source in self.cache_dir.iterdir():
            if source.suffix in _HS_SUFFIXES and not (self.dbdir / source.name).exists():
                target = self.dbdir / source.name
                shutil.copyfile(source, target)
                os.chown(target, uid, gid)
                copied += 1
        return copied > 0 or any(p.suffix in _HS_SUFFIXES for p in self.dbdir.iterdir())

    def _save_cache(self) -> None:
        """Copy DBDIR's hyperscan files to the cache, each by an atomic rename (the names are
        content hashes, so concurrent runs writing the same file do not conflict)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for source in self.dbdir.iterdir():
            target = self.cache_dir / source.name
            if source.suffix not in _HS_SUFFIXES or target.exists():
                continue
            tmp = self.cache_dir / f".{source.name}.{os.getpid()}.tmp"
            with contextlib.suppress(OSError):
                shutil.copyfile(source, tmp)
                tmp.replace(target)
            tmp.unlink(missing_ok=True)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as reply:
        return reply.read().strip()


def _rspamd_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(RSPAMD_USER)
    return entry.pw_uid, entry.pw_gid


def _rspamd_version() -> str:
    """e.g. "3.4" (the cache is only valid for the rules of one package version)."""
    out = subprocess.run(["rspamd", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().rsplit(" ", 1)[-1] or "unknown"
