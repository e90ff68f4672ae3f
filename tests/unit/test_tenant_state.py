"""tenants.sqlite: sessions across processes, the hourly window, the verdict window and resume,
and the two bugs of the last attempt: spam accepted in the moment the suspension triggers is
held at enqueue (not left deferred), and resume does not re-suspend from the old window."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from gateway.config import TenantDefaults
from gateway.intake.tenant_limits import TenantGuard
from gateway.metrics import Metrics
from gateway.policy.chain import Action, Decision, MessageContext
from gateway.queue.model import HoldReason, MessageState, Route
from gateway.queue.spool import Spool
from gateway.tenants import Tenant
from gateway.tenants.state import TenantState
from gateway.tenants.suspension import Suspension


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


TENANT = Tenant("customer-a", ("a.example",), TenantDefaults(suspend_min_messages=4),
                (ipaddress.ip_network("192.0.2.1/32"),))  # fmt: skip


def test_sessions_shared_by_two_handles(tmp_path: Path) -> None:
    one, two = TenantState(tmp_path / "t.sqlite"), TenantState(tmp_path / "t.sqlite")
    assert one.open_session("a", "192.0.2.1", 2, 5) is None
    assert two.open_session("a", "192.0.2.2", 2, 5) is None
    assert one.open_session("a", "192.0.2.3", 2, 5) == "max_sessions"
    assert two.open_session("b", "192.0.2.9", 2, 1) is None
    assert one.open_session("b", "192.0.2.9", 2, 1) == "max_sessions_per_ip"
    two.close_session("a", "192.0.2.2")
    assert one.sessions() == {"a": 1, "b": 1}


def test_hourly_window_slides_by_minutes(tmp_path: Path) -> None:
    clock = Clock()
    state = TenantState(tmp_path / "t.sqlite", clock)
    state.record("a", messages=1, recipients=3)
    clock.now += 1800
    state.record("a", messages=2, recipients=2)
    messages, recipients, retry = state.last_hour("a")
    assert (messages, recipients) == (3, 5) and 0 < retry <= 1860
    clock.now += 1860
    assert state.last_hour("a")[:2] == (2, 2)


async def test_suspension_holds_spam_at_enqueue_and_resume_restarts_window(
    tmp_path: Path,
) -> None:
    clock = Clock()
    spool = await Spool.open(tmp_path / "queue.sqlite")
    try:
        state = TenantState(tmp_path / "tenants.sqlite", clock)
        guard = TenantGuard(state, Metrics(), Suspension(spool, "gw.example.net", "ops@x.example"))
        waiting = await spool.enqueue("s@a.example", ["r@far.example"], b"x",
                                      route=Route.BAD_GATEWAY, tenant="customer-a")  # fmt: skip
        spam = Decision(Action.REROUTE, None, [])
        ctx = MessageContext(client_ip="192.0.2.1", rcpt_tos=["r@far.example"], tenant="customer-a")
        held = [await guard.before_queue(TENANT, ctx, spam) for _ in range(4)]
        # the 4th message triggered the suspension: it is held at enqueue, not deferred
        assert held == [False, False, False, True] and state.suspended("customer-a")
        message = await spool.load(waiting)  # the sweep held what was waiting
        assert message is not None and message.state == MessageState.HELD
        assert message.hold_reason == HoldReason.SUSPENDED
        notices = [m for m in await spool.list() if m.recipients[0].address == "ops@x.example"]
        assert len(notices) == 1
        assert await guard.before_queue(TENANT, ctx, spam)  # another worker: held too
        assert state.resume("customer-a", "cleaned", "operator")
        clock.now += 61
        assert not await guard.before_queue(TENANT, ctx, spam)  # the old window is gone
        assert not state.suspended("customer-a")
        reopened = TenantState(tmp_path / "tenants.sqlite", clock)  # a restart
        assert reopened.status("customer-a").status.reason == "cleaned"
    finally:
        await spool.close()
