"""An in-process intake over a real socket and a real spool (SQLite in a temporary directory).

The same chain as tests/unit/test_intake.py's ``relay`` fixture, but the messages go to the
real :class:`Spool`, so what the spool refuses to store (invalid UTF-8 in a text column, say)
shows: used by test_intake_input.py and the fuzz test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from gateway.config import parse_config
from gateway.dns import Resolver
from gateway.intake import Intake, Runtime
from gateway.metrics import Metrics
from gateway.policy.chain import Chain
from gateway.policy.rules.recipient import RecipientRule
from gateway.policy.rules.relay_control import RelayControlRule
from gateway.policy.rules.sender_domain import SenderDomainRule
from gateway.queue.spool import Spool
from gateway.services import Services
from tests.unit.fakedns import FakeZone, start_fake_dns
from tests.unit.test_intake import GATEWAY, BodyRule, RecordingCleanup


@dataclasses.dataclass
class RealRelay:
    intake: Intake
    spool: Spool
    port: int
    metrics: Metrics

    async def stored(self) -> int:
        """How many messages the spool holds."""
        return len(await self.spool.list())


@asynccontextmanager
async def real_spool_relay(directory: Path, **gateway: object) -> AsyncIterator[RealRelay]:
    zone = FakeZone()
    zone.add("example.net", "MX", "10 mx.example.net.")
    zone.add("mx.example.net", "A", "127.0.0.10")
    transport, dns_port = await start_fake_dns(zone)
    config = parse_config(
        {
            "gateway": {**GATEWAY, **gateway},
            "dns": {
                "nameservers": [f"127.0.0.1:{dns_port}"],
                "extra_public_networks": ["127.0.0.0/8"],
                "timeout": "300ms",
            },
        }
    )
    config = dataclasses.replace(
        config, gateway=dataclasses.replace(config.gateway, listen=[("127.0.0.1", 0)])
    )
    spool, metrics = await Spool.open(directory), Metrics()
    services = Services(config, resolver=Resolver(config.dns), spool=spool, metrics=metrics)
    chain = Chain(
        [
            RelayControlRule(config.gateway.client_networks),
            SenderDomainRule(services.resolver),
            RecipientRule(config.gateway.max_recipients),
            BodyRule(),
        ]
    )
    intake = Intake(services, Runtime(config, chain, RecordingCleanup(services)))
    await intake.start()
    try:
        yield RealRelay(intake, spool, intake.addresses[0][1], metrics)
    finally:
        await intake.stop(grace=1)
        await spool.close()
        transport.close()
