"""apt-cacher-ng on 198.51.100.1:3142 so the hosts can install Debian packages.

Its own minimal config: no Remap lines (Debian's default remaps to a mirror that does not
resolve here), so it forwards each request to the host named in the URL, which this machine
resolves. The cache lives in lab/cache/ and survives `down`, so the next deploy is faster.
"""

from __future__ import annotations

import http.client

from lab.config import APT_PROXY_PORT, BRIDGE_ADDR, CACHE_DIR, RUN_DIR
from lab.proc import LabError, daemon_pid, start_daemon, stop_daemon, wait_until

ACNG_RUN = RUN_DIR / "apt-cacher-ng"
ACNG_CACHE = CACHE_DIR / "apt-cacher-ng"
DAEMON = "apt-cacher-ng"


def config() -> str:
    return (
        "# Written by lab/cacher.py (no Remap-* lines on purpose).\n"
        f"CacheDir: {ACNG_CACHE}\n"
        f"LogDir: {ACNG_RUN / 'log'}\n"
        "SupportDir: /usr/lib/apt-cacher-ng\n"
        f"SocketPath: {ACNG_RUN / 'socket'}\n"
        f"PidFile: {ACNG_RUN / 'pid'}\n"
        f"BindAddress: {BRIDGE_ADDR}\n"
        f"Port: {APT_PROXY_PORT}\n"
        "ForeGround: 1\n"
        "ExThreshold: 4\n"
        "ReportPage: acng-report.html\n"
    )


def start(*, timeout: float = 15) -> None:
    conf_dir = ACNG_RUN / "conf"
    for d in (conf_dir, ACNG_RUN / "log", ACNG_CACHE):
        d.mkdir(parents=True, exist_ok=True)
    (conf_dir / "acng.conf").write_text(config())
    start_daemon(DAEMON, ["apt-cacher-ng", "-c", conf_dir])

    def ready() -> bool:
        if daemon_pid(DAEMON) is None:
            raise LabError("apt-cacher-ng exited; see lab/run/logs/apt-cacher-ng.log")
        return report_page_answers()

    wait_until("apt-cacher-ng to answer", ready, timeout=timeout, interval=0.1)


def report_page_answers() -> bool:
    conn = http.client.HTTPConnection(BRIDGE_ADDR, APT_PROXY_PORT, timeout=1)
    try:
        conn.request("GET", "/acng-report.html")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def stop() -> None:
    stop_daemon(DAEMON)
