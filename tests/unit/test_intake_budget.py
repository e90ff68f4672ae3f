"""The memory budget for message bytes in flight (``gateway.data_memory``): sessions wait for
it (TCP back-pressure), give up with ``452 4.3.1`` after the DATA timeout, and every way a
DATA phase ends gives its share back."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.budget import DataBudget
from gateway.config import ConfigError, parse_config
from gateway.intake import Intake, Runtime
from gateway.metrics import Metrics
from gateway.policy.chain import Chain
from gateway.policy.cleanup import Cleanup
from gateway.policy.rules.relay_control import RelayControlRule
from gateway.services import Services
from tests.unit.test_intake import BodyRule, Client, FakeSpool

GATEWAY = {
    "hostname": "gw.example.net",
    "role": "bad",
    "client_networks": ["127.0.0.0/29"],
    "max_message_size": 300_000,
    "data_memory": 500_000,
    "idle_timeout": "5s",
    "data_timeout": "5s",
}
LINES = b"abcdefgh.\r\n"
BODY = b"Subject: big\r\n\r\n" + LINES * 25_000  # 275 KB: several of the reader's pieces


@dataclasses.dataclass
class Relay:
    intake: Intake
    spool: FakeSpool
    port: int
    metrics: Metrics


RelayFactory = Callable[..., Any]


@pytest.fixture
async def make_relay() -> AsyncIterator[RelayFactory]:
    started: list[Intake] = []

    async def make(**gateway: Any) -> Relay:
        config = parse_config({"gateway": {**GATEWAY, **gateway}})
        config = dataclasses.replace(
            config, gateway=dataclasses.replace(config.gateway, listen=[("127.0.0.1", 0)])
        )
        spool, metrics = FakeSpool(), Metrics()
        services = Services(config, spool=spool, metrics=metrics)
        chain = Chain([RelayControlRule(config.gateway.client_networks), BodyRule()])
        intake = Intake(services, Runtime(config, chain, Cleanup(services)))
        await intake.start()
        started.append(intake)
        return Relay(intake, spool, intake.addresses[0][1], metrics)

    yield make
    for intake in started:
        await intake.stop(grace=1)


async def _in_data(relay: Relay, size: int | None = None) -> Client:
    """A client after DATA's 354, having declared ``SIZE=size`` (or nothing)."""
    client, _ = await Client.connect(relay.port)
    assert (await client.cmd("EHLO client.example.net")).startswith("250")
    declared = f" SIZE={size}" if size else ""
    assert (await client.cmd(f"MAIL FROM:<a@example.net>{declared}")).startswith("250")
    assert (await client.cmd("RCPT TO:<b@example.net>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    return client


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_session_waits_for_the_budget_then_goes_on(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    first = await _in_data(relay, len(BODY))
    await _until(lambda: relay.intake.data_budget.used == len(BODY))  # SIZE= taken at once
    second = await _in_data(relay, len(BODY))
    await second.send(BODY + b".\r\n")
    # 2 x 275 KB > 500 KB: the second waits, reading nothing, and says nothing
    waiting = asyncio.ensure_future(second.reply())
    await asyncio.sleep(0.5)
    assert not waiting.done()
    assert relay.intake.data_budget.used == len(BODY)
    assert (await first.cmd(BODY + b".")).startswith("250")
    assert (await asyncio.wait_for(waiting, 5)).startswith("250")
    assert [len(m["data"]) > len(BODY) for m in relay.spool.messages] == [True, True]
    assert relay.intake.data_budget.used == 0


async def test_budget_wait_ends_with_452_at_the_data_timeout(make_relay: RelayFactory) -> None:
    relay = await make_relay(data_timeout="1s")
    held = relay.intake.data_budget.reservation()
    assert held.take_now(400_000)  # what other sessions hold, for longer than this DATA timeout
    client = await _in_data(relay)  # no SIZE=: it takes the budget piece by piece
    started = asyncio.get_running_loop().time()
    await client.send(BODY + b".\r\n")
    assert (await client.reply()).startswith("452 4.3.1")
    assert 0.8 < asyncio.get_running_loop().time() - started < 3
    assert relay.metrics.value("rejected", stage="data", reason="memory") == 1
    assert relay.spool.messages == []
    assert relay.intake.data_budget.used == 400_000  # the refused session gave its share back
    held.release()
    await client.start_mail()  # the session goes on; the client retries
    assert (await client.cmd(BODY + b".")).startswith("250")
    assert relay.intake.data_budget.used == 0


async def test_a_session_killed_mid_data_releases_its_share(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    client = await _in_data(relay)
    await client.send(BODY[:200_000])
    await _until(lambda: relay.intake.data_budget.used >= 100_000)
    client.writer.transport.abort()
    await _until(lambda: relay.intake.data_budget.used == 0)
    prepaid = await _in_data(relay, 250_000)
    await _until(lambda: relay.intake.data_budget.used == 250_000)
    prepaid.writer.transport.abort()
    await _until(lambda: relay.intake.data_budget.used == 0)
    other = await _in_data(relay, 300_000)
    assert (await other.cmd(BODY + b".")).startswith("250")


async def test_refused_messages_release_their_share(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    client, _ = await Client.connect(relay.port)
    await client.start_mail()
    assert (await client.cmd(BODY + LINES * 3000 + b".")).startswith("552")
    await client.start_mail()
    assert (await client.cmd(BODY + b"VIRUS\r\n.")).startswith("554")
    await client.start_mail()
    assert (await client.cmd(BODY + b"bare\nLF\r\n.")).startswith("550 5.6.11")
    assert relay.intake.data_budget.used == 0


async def test_budget_is_first_come_first_served() -> None:
    budget = DataBudget(100)
    first, second, third = budget.reservation(), budget.reservation(), budget.reservation()
    assert first.take_now(80)
    big = asyncio.ensure_future(second.take(60, 5))
    await asyncio.sleep(0.05)
    assert not third.take_now(10)  # would fit, but the waiter before it comes first
    first.release()
    assert await big
    assert budget.used == 60
    assert not await third.take(50, 0.05)  # timed out: nothing taken, nothing left queued
    second.release()
    assert budget.used == 0 and not budget._waiters


async def test_sessions_that_would_all_wait_do_not_deadlock() -> None:
    budget = DataBudget(100)
    first, second = budget.reservation(), budget.reservation()
    assert first.take_now(50) and second.take_now(50)
    waiting = asyncio.ensure_future(first.take(10, 5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert not await second.take(10, 5)  # both would wait for ever: the later one gives up
    second.release()
    assert await waiting
    assert budget.used == 60


def test_data_memory_must_hold_the_largest_message() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.data_memory"):
        parse_config({"gateway": {**GATEWAY, "data_memory": "200KB"}})
    with pytest.raises(ConfigError, match=r"gateway\.data_memory"):
        parse_config({"gateway": {**GATEWAY, "data_memory": "lots"}})
    assert parse_config({"gateway": GATEWAY}).gateway.data_memory == 500_000
    defaults = {"hostname": "g.example", "role": "bad"}
    assert parse_config({"gateway": defaults}).gateway.data_memory == 256 << 20
