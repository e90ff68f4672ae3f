"""The health gauges (issue 15, point 1) against the real daemons: clamd's PING and rspamd's
/ping up and then down, the bad gateway's greeting, the queue by route and state with the
oldest message's age, waiting mail per destination, the certificate's expiry, DKIM keys."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.dkim import write_new_key
from gateway.health import Health, probe_all
from gateway.metrics import Metrics
from gateway.queue.spool import Spool
from gateway.services import Services
from tests.harness import free_port

pytestmark = pytest.mark.integration


async def _greeter(banner: bytes) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()
        await reader.readline()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _config(tmp_path: Path, clamd, rspamd, cert, bad_port: int, dead_port: int, key: Path):
    return parse_config(
        {
            "gateway": {
                "hostname": "gw.example.net", "role": "good", "spool": str(tmp_path / "spool"),
                "tls_cert": str(cert.cert_path), "tls_key": str(cert.key_path),
            },
            "virus": {"clamd": f"unix:{clamd.socket_path}"},
            "spam": {"rspamd_url": rspamd.url},
            "routing": {"bad_gateways": [f"127.0.0.1:{bad_port}", f"127.0.0.1:{dead_port}"]},
            "dkim": {"keys": [
                {"domain": "customer-a.example", "selector": "s1", "key": str(key)},
                {"domain": "customer-b.example", "selector": "s1", "key": str(tmp_path / "no")},
            ]},
        }
    )  # fmt: skip


async def test_health_gauges(tmp_path: Path, clamd_private, rspamd, test_ca) -> None:
    from gateway.services import build_services

    cert = test_ca.valid("gw.example.net")
    key, _ = write_new_key(tmp_path / "dkim", "customer-a.example", "s1", "ed25519")
    (tmp_path / "no").write_bytes(key.read_bytes())
    (tmp_path / "no").chmod(0o600)
    server, bad_port = await _greeter(b"220 bad.example ESMTP\r\n")
    dead_port = free_port("127.0.0.1")
    config = _config(tmp_path, clamd_private, rspamd, cert, bad_port, dead_port, key)
    spool = await Spool.open(config.gateway.spool)
    try:
        await spool.enqueue("a@customer-a.example", ["b@far.example"], b"S: 1\r\n\r\nx\r\n")
        # The relay loaded both keys at start; then one file went away (a reload would fail).
        services = build_services(config, spool=spool)
        (tmp_path / "no").unlink()
        values = await probe_all(config, services, {})
        assert values["smg_scanner_up"] == {(("scanner", "clamd"),): 1, (("scanner", "rspamd"),): 1}
        assert values["smg_bad_gateway_up"] == {
            (("bad_gateway", f"127.0.0.1:{bad_port}"),): 1,
            (("bad_gateway", f"127.0.0.1:{dead_port}"),): 0,
        }
        assert values["smg_dkim_key_usable"] == {
            (("domain", "customer-a.example"), ("selector", "s1")): 1,
            (("domain", "customer-b.example"), ("selector", "s1")): 0,
        }
        expiry = values["smg_tls_certificate_expiry_seconds"][(("path", str(cert.cert_path)),)]
        assert abs(expiry - (cert.not_after.timestamp() - time.time())) < 5
        sizes = values["smg_queue_route_messages"]
        assert sizes[(("route", "direct"), ("state", "active"))] == 1
        assert sizes[(("route", "bad_gateway"), ("state", "deferred"))] == 0
        assert values["smg_queue_oldest_seconds"][(("route", "direct"), ("state", "active"))] < 60

        clamd_private.close()  # clamd down: the gauge says so within one probe
        values = await probe_all(config, services, {})
        assert values["smg_scanner_up"][(("scanner", "clamd"),)] == 0

        metrics = Metrics()
        Health(lambda: (config, services)).register(metrics)
        text = await metrics.render()
        assert 'smg_scanner_up{scanner="clamd"} 0' in text
        assert 'smg_scanner_up{scanner="rspamd"} 1' in text
        assert 'smg_queue_route_messages{route="direct",state="active"} 1' in text
        assert "smg_health_probe_timestamp_seconds " in text
    finally:
        server.close()
        await spool.close()


async def test_waiting_per_destination_is_bounded(tmp_path: Path) -> None:
    from gateway.health import TOP_DESTINATIONS, queue_gauges

    spool = await Spool.open(tmp_path / "spool")
    try:
        for n in range(TOP_DESTINATIONS + 5):
            queue_id = await spool.enqueue("a@x.example", [f"b@d{n}.example"], b"S: 1\r\n\r\nx\r\n")
            await spool.hold(queue_id)
        waiting = (await queue_gauges(spool))["smg_queue_destination_waiting"]
        assert len(waiting) == TOP_DESTINATIONS + 1
        assert waiting[(("destination", "_other"),)] == 5
    finally:
        await spool.close()


def test_services_without_scanners_give_no_series() -> None:
    config = parse_config({"gateway": {"hostname": "gw.example.net", "role": "bad"}})
    values = asyncio.run(probe_all(config, Services(config), {}))
    assert values["smg_scanner_up"] == {} and values["smg_bad_gateway_up"] == {}
