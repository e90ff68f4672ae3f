"""Health gauges, read when Prometheus scrapes ``/metrics`` (the alert rules depend on them).

    smg_queue_route_messages{route,state}      messages by route (direct, bad_gateway) and state
    smg_queue_oldest_seconds{route,state}      age of the oldest message in that group
    smg_queue_destination_waiting{destination} deferred+held messages of the 20 largest
                                               destinations (the rest summed as "_other")
    smg_tls_certificate_expiry_seconds{path}   seconds until the intake certificate expires
                                               (negative: expired; -1e9: unreadable)
    smg_dkim_key_usable{domain,selector}       1 if the key file loads, else 0 (good gateway)
    smg_scanner_up{scanner}                    1 if clamd answers PING / rspamd /ping
    smg_bad_gateway_up{bad_gateway}            1 if the bad gateway greets with 220 (good gw)
    smg_health_probe_timestamp_seconds         when the probes last ran

Probes (scanners, the bad gateway, files, the spool's group query) run together at most every
:data:`MIN_INTERVAL` seconds, each bounded by :data:`PROBE_TIMEOUT`, so a scrape stays within
Prometheus' timeout and two Prometheus servers do not double the load.  The gauges come from the
running relay's current config and services (a reload changes them at the next probe).  The
bad gateway's probe is a real SMTP greeting and ``QUIT`` (it shows in that gateway's log as a
connection from this host, every ``MIN_INTERVAL`` at most).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import ssl
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509

from gateway.config import Config
from gateway.dkim import load_private_key
from gateway.metrics import Metrics
from gateway.queue.model import MessageState
from gateway.services import Services

MIN_INTERVAL = 10.0  # seconds between two probe rounds
PROBE_TIMEOUT = 3.0  # per probe (connect + answer)
TOP_DESTINATIONS = 20  # label cardinality bound: customers pick recipient domains freely
UNREADABLE = -1e9  # expiry of a certificate that cannot be read (fires the expiry alert)

Series = dict[tuple[tuple[str, str], ...], float]

GAUGES = {
    "smg_queue_route_messages": "Messages in the queue by route and state.",
    "smg_queue_oldest_seconds": "Age of the oldest message by route and state.",
    "smg_queue_destination_waiting": "Deferred and held messages per destination (top 20).",
    "smg_tls_certificate_expiry_seconds": "Seconds until the intake TLS certificate expires.",
    "smg_dkim_key_usable": "1 if the DKIM key file loads, else 0.",
    "smg_scanner_up": "1 if the scanner answers its ping, else 0.",
    "smg_bad_gateway_up": "1 if the bad gateway greets with 220, else 0.",
    "smg_health_probe_timestamp_seconds": "Unix time of the last health probe round.",
}


class Health:
    """The probes and their last results; :meth:`register` adds the gauges to ``metrics``."""

    def __init__(self, current: Callable[[], tuple[Config, Services | None]]) -> None:
        self._current = current
        self._values: dict[str, Series] = {name: {} for name in GAUGES}
        self._last = 0.0
        self._lock = asyncio.Lock()
        self._cert_cache: dict[str, tuple[float, float]] = {}  # path -> (mtime, not_after)

    def register(self, metrics: Metrics) -> None:
        for name, help_text in GAUGES.items():
            metrics.gauge_source(name, help_text, self._source(name))

    def _source(self, name: str) -> Callable[[], Any]:
        async def read() -> Series:
            await self.refresh()
            return self._values[name]

        return read

    async def refresh(self, force: bool = False) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._last < MIN_INTERVAL:
                return
            config, services = self._current()
            values = await probe_all(config, services, self._cert_cache)
            self._values.update(values)
            self._values["smg_health_probe_timestamp_seconds"] = {(): time.time()}
            self._last = time.monotonic()


async def probe_all(
    config: Config, services: Services | None, cert_cache: dict[str, tuple[float, float]]
) -> dict[str, Series]:
    spool = services.spool if services else None
    queue, scanners, gateways = await asyncio.gather(
        queue_gauges(spool) if spool is not None else _nothing(),
        scanner_gauges(services),
        bad_gateway_gauges(config),
    )
    out = dict(queue)
    out["smg_scanner_up"] = scanners
    out["smg_bad_gateway_up"] = gateways
    out["smg_tls_certificate_expiry_seconds"] = certificate_gauges(config, cert_cache)
    out["smg_dkim_key_usable"] = dkim_gauges(config)
    return out


async def _nothing() -> dict[str, Series]:
    return {}


# --- the queue ------------------------------------------------------------------------------


def _queue_rows(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
    groups = conn.execute(
        "SELECT route, state, COUNT(*), MIN(created_at) FROM messages GROUP BY route, state"
    ).fetchall()
    # The (destination, state, next_attempt) index covers this: no message rows are read.
    waiting = conn.execute(
        "SELECT destination, COUNT(*) FROM messages WHERE state IN (?, ?)"
        " GROUP BY destination ORDER BY 2 DESC",
        (MessageState.DEFERRED, MessageState.HELD),
    ).fetchall()
    return groups, waiting


async def queue_gauges(spool: Any) -> dict[str, Series]:
    # The spool's reader thread: reads never block the relay's writes (WAL).
    groups, waiting = await spool._read(_queue_rows)
    now = time.time()
    sizes: Series = {}
    oldest: Series = {}
    for route in ("direct", "bad_gateway"):  # every series exists, also at 0
        for state in MessageState:
            sizes[(("route", route), ("state", str(state)))] = 0.0
            oldest[(("route", route), ("state", str(state)))] = 0.0
    for route, state, count, created in groups:
        key = (("route", route), ("state", state))
        sizes[key] = float(count)
        oldest[key] = max(0.0, now - float(created))
    per_destination: Series = {}
    for index, (destination, count) in enumerate(waiting):
        name = (destination or "_none") if index < TOP_DESTINATIONS else "_other"
        key = (("destination", name),)
        per_destination[key] = per_destination.get(key, 0.0) + float(count)
    return {
        "smg_queue_route_messages": sizes,
        "smg_queue_oldest_seconds": oldest,
        "smg_queue_destination_waiting": per_destination,
    }


# --- scanners and the bad gateway -----------------------------------------------------------


async def _bounded(probe: Any) -> bool:
    try:
        return bool(await asyncio.wait_for(probe, PROBE_TIMEOUT))
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, ssl.SSLError):
        return False


async def scanner_gauges(services: Services | None) -> Series:
    if services is None:
        return {}
    probes: dict[str, Any] = {}
    if services.clamd is not None:
        probes["clamd"] = services.clamd.ping()
    if services.rspamd is not None:
        probes["rspamd"] = rspamd_ping(services.rspamd)
    results = await asyncio.gather(*(_bounded(p) for p in probes.values()))
    return {(("scanner", name),): float(up) for name, up in zip(probes, results, strict=True)}


async def _http_ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> bool:
    try:
        writer.write(f"GET /ping HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        return status.startswith(b"HTTP/") and status.split()[1:2] == [b"200"]
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def rspamd_ping(client: Any) -> bool:
    """rspamd's worker answers ``GET /ping`` with 200 ``pong``."""
    if client.socket_path:
        reader, writer = await asyncio.open_unix_connection(client.socket_path)
    else:
        reader, writer = await asyncio.open_connection(client.host, client.port, ssl=client.ssl)
    return await _http_ping(reader, writer, client.host)


async def smtp_greets(host: str, port: int) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        greeting = await reader.readline()
        if greeting.startswith(b"220"):
            writer.write(b"QUIT\r\n")
            await writer.drain()
            return True
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def bad_gateway_gauges(config: Config) -> Series:
    if config.gateway.role != "good":
        return {}
    gateways = list(config.routing.bad_gateways)
    results = await asyncio.gather(*(_bounded(smtp_greets(h, p)) for h, p in gateways))
    return {
        (("bad_gateway", f"{host}:{port}"),): float(up)
        for (host, port), up in zip(gateways, results, strict=True)
    }


# --- files: the certificate and the DKIM keys -----------------------------------------------


def certificate_gauges(config: Config, cache: dict[str, tuple[float, float]]) -> Series:
    path = config.gateway.tls_cert
    if path is None:
        return {}
    key = (("path", str(path)),)
    try:
        mtime = path.stat().st_mtime
        cached = cache.get(str(path))
        if cached is None or cached[0] != mtime:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            cache[str(path)] = cached = (mtime, cert.not_valid_after_utc.timestamp())
        return {key: cached[1] - time.time()}
    except (OSError, ValueError):
        return {key: UNREADABLE}


def dkim_gauges(config: Config) -> Series:
    if config.gateway.role != "good":
        return {}
    out: Series = {}
    # The fleet-wide keys and each customer's own ([[tenants]] dkim): both sign.
    keys = [*config.dkim.keys, *(key for tenant in config.tenants for key in tenant.dkim)]
    for entry in keys:
        try:
            load_private_key(entry.key)
            usable = 1.0
        except Exception:  # missing, unreadable, wrong mode, not a key: all mean "cannot sign"
            usable = 0.0
        out[(("domain", entry.domain), ("selector", entry.selector))] = usable
    return out
