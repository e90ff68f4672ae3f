"""Prometheus metrics in the text exposition format, served on ``gateway.metrics_listen``.

A tiny asyncio HTTP/1.0 server (no dependency): ``GET /metrics`` returns every counter and
gauge; anything else is 404.  Bind it to loopback: the exporter has no authentication.

Counters the relay keeps (names are stable, dashboards depend on them):

- ``smg_messages_received_total``: messages acknowledged with 250 (queued);
- ``smg_messages_rejected_total{stage, reason}``: refused in the SMTP session, by the rule or
  the protocol limit that refused (``relay_control``, ``sender_domain``, ``size``, ...);
- ``smg_messages_tempfailed_total{stage, reason}``: the part of those refused with a 4xx
  (``virus``/``spam``: the scanner did not answer);
- ``smg_recipients_delivered_total``, ``smg_recipients_deferred_total``,
  ``smg_recipients_bounced_total``: delivery outcomes per recipient (counted by delivery);
- ``smg_messages_expired_total``: messages that reached ``delivery.max_lifetime``;
- ``smg_connections_total``, ``smg_connections_refused_total{reason}``;
- gauges ``smg_queue_messages{state}`` (read from the spool at each scrape) and
  ``smg_connections_active``.

Other modules count with ``services.metrics.inc("delivered")`` (the short names below) or any
``smg_*`` name of their own; a counter appears on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.queue.model import DeliveryStatus

log = logging.getLogger("smg.metrics")

# short name -> (metric name, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "received": ("smg_messages_received_total", "Messages accepted with 250 and queued."),
    "rejected": ("smg_messages_rejected_total", "SMTP transactions refused, by stage and reason."),
    "tempfailed": (
        "smg_messages_tempfailed_total",
        "SMTP transactions refused with 4xx (try later), by stage and rule.",
    ),
    "delivered": ("smg_recipients_delivered_total", "Recipients delivered to the far end."),
    "deferred": ("smg_recipients_deferred_total", "Recipients deferred after a failed attempt."),
    "bounced": ("smg_recipients_bounced_total", "Recipients bounced (NDR sent or due)."),
    "held": ("smg_recipients_held_total", "Recipients held (TLS could not be had)."),
    "expired": ("smg_messages_expired_total", "Messages that reached delivery.max_lifetime."),
    "connections": ("smg_connections_total", "SMTP connections accepted by the intake."),
    "connections_refused": (
        "smg_connections_refused_total",
        "SMTP connections refused at connect, by reason.",
    ),
}

_OUTCOMES = {DeliveryStatus.SENT: "delivered", DeliveryStatus.HELD: "held"}

GaugeSource = Callable[[], Awaitable[dict[tuple[tuple[str, str], ...], float]]]


def _labels_key(labels: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((key, str(value)) for key, value in labels.items()))


def _escape(value: str) -> str:
    """Label values escape backslash, double quote and newline (exposition format)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_labels(key: tuple[tuple[str, str], ...]) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in key) + "}"


class Metrics:
    """Counters and gauges in memory; :meth:`render` gives the exposition text."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._help: dict[str, str] = {}
        self._gauges: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._gauge_sources: dict[str, GaugeSource] = {}
        self._peers: Callable[[], list[dict[str, Any]]] | None = None
        self._server: asyncio.AbstractServer | None = None

    def inc(self, name: str, value: float = 1, **labels: Any) -> None:
        """Add ``value`` to the counter ``name`` (a short name of :data:`COUNTERS`)."""
        metric, help_text = COUNTERS.get(name, (name, ""))
        if not metric.startswith("smg_"):
            metric = f"smg_{metric}_total"
        self._help.setdefault(metric, help_text)
        series = self._counters.setdefault(metric, {})
        key = _labels_key(labels)
        series[key] = series.get(key, 0) + value

    def declare(self, name: str, *label_sets: dict[str, Any]) -> None:
        """Show counter ``name`` at 0 for each label set that has not counted yet.

        A series that appears only at its first event has no ``increase()`` over that event
        (Prometheus needs two samples), and a dashboard panel for a quiet customer would be
        empty instead of 0; so the series a dashboard or alert names exist from the start.
        """
        for labels in label_sets:
            self.inc(name, 0, **labels)

    def delivery_outcome(self, status: DeliveryStatus) -> None:
        """One recipient's attempt ended: ``sent``, ``deferred``, ``bounced`` or ``held``."""
        self.inc(_OUTCOMES.get(status, status))

    def set_gauge(self, name: str, value: float, help_text: str = "", **labels: Any) -> None:
        self._help.setdefault(name, help_text)
        self._gauges.setdefault(name, {})[_labels_key(labels)] = value

    def gauge_source(self, name: str, help_text: str, source: GaugeSource) -> None:
        """``await source()`` at each scrape gives ``{labels_key: value}`` for ``name``."""
        self._help[name] = help_text
        self._gauge_sources[name] = source

    def value(self, name: str, **labels: Any) -> float:
        """A counter's current value (tests and ``smg`` diagnostics)."""
        metric = COUNTERS.get(name, (name, ""))[0]
        return self._counters.get(metric, {}).get(_labels_key(labels), 0)

    def counter_snapshot(self) -> dict[str, Any]:
        """The counters as JSON-able data (gateway.metrics_share: the other workers')."""
        return {
            metric: {"help": self._help.get(metric, ""),
                     "series": [[list(map(list, key)), value] for key, value in series.items()]}
            for metric, series in self._counters.items()
        }  # fmt: skip

    def add_peers(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        """``source()`` gives other workers' :meth:`counter_snapshot`: added at each render."""
        self._peers = source

    def _all_counters(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        if self._peers is None:
            return self._counters
        merged = {metric: dict(series) for metric, series in self._counters.items()}
        for snapshot in self._peers():
            for metric, family in snapshot.items():
                try:
                    pairs = [(tuple((str(k), str(v)) for k, v in key), float(value))
                             for key, value in family["series"]]  # fmt: skip
                except (KeyError, TypeError, ValueError):
                    continue  # a damaged file: its share is missing from this scrape only
                self._help.setdefault(metric, str(family.get("help", "")))
                series = merged.setdefault(metric, {})
                for key, value in pairs:
                    series[key] = series.get(key, 0) + value
        return merged

    async def render(self) -> str:
        lines: list[str] = []
        counters = self._all_counters()
        for metric in sorted(counters):
            lines += self._family(metric, "counter", counters[metric])
        gauges = dict(self._gauges)
        for name, source in self._gauge_sources.items():
            try:
                gauges[name] = await asyncio.wait_for(source(), timeout=5)
            except Exception as exc:  # a scrape must not fail because the spool is busy
                log.warning("metrics: gauge %s unavailable: %s", name, exc)
        for metric in sorted(gauges):
            lines += self._family(metric, "gauge", gauges[metric])
        return "\n".join(lines) + "\n"

    def _family(self, metric: str, kind: str, series: dict[Any, float]) -> list[str]:
        lines = []
        if self._help.get(metric):
            lines.append(f"# HELP {metric} {self._help[metric]}")
        lines.append(f"# TYPE {metric} {kind}")
        for key, value in sorted(series.items()):
            number = int(value) if float(value).is_integer() else value
            lines.append(f"{metric}{_render_labels(key)} {number}")
        return lines

    # --- the HTTP endpoint ----------------------------------------------------------------

    async def serve(self, host: str, port: int) -> asyncio.AbstractServer:
        self._server = await asyncio.start_server(self._handle, host, port)
        return self._server

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method == "GET" and path == "/metrics":
                body = (await self.render()).encode()
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
