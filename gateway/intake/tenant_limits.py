"""The customers' limits and suspension at the intake (issue 11), on ``<spool>/tenants.sqlite``
(:mod:`gateway.tenants.state`, shared by the workers).

- at connect: the customer's sessions on this host and per client address: ``421 4.7.0``;
- at MAIL: a suspended customer gets ``451 4.7.1 Customer <name> is suspended``; messages of
  the last hour at ``messages_per_hour``: ``451 4.7.1 ... retry after N s``; a ``SIZE=`` over
  the customer's ``max_message_size``: ``552 5.3.4``;
- at RCPT: recipients of the last hour (with this transaction's) at ``recipients_per_hour``:
  ``452 4.7.1 ... retry after N s``;
- at the end of DATA (:meth:`TenantGuard.before_queue`): the message and its verdict are
  counted, the window is judged (spam share, reject share) and the customer suspended when it
  passes; then, if the customer is suspended *now* (by this message, another worker or an
  operator), its spam is queued HELD (reason ``suspended``), never deferred to go out later.
  On the suspension itself the customer's queued spam is held and the operations mailbox is
  told once (:mod:`gateway.tenants.suspension`).
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.log import event
from gateway.metrics import Metrics
from gateway.policy.chain import Action, Decision, MessageContext
from gateway.tenants import Tenant
from gateway.tenants.state import TenantState

log = logging.getLogger("smg.intake")


# The counters of each customer, declared at 0 when the relay starts (Metrics.declare).
TENANT_COUNTERS = (
    "smg_tenant_messages_accepted_total", "smg_tenant_bytes_total", "smg_tenant_spam_total",
    "smg_tenant_virus_total",
    *(f"smg_tenant_recipients_{s}_total" for s in ("sent", "deferred", "bounced", "held")),
)  # fmt: skip
RATE_LIMITS = ("max_sessions", "max_sessions_per_ip", "messages_per_hour", "recipients_per_hour")


def declare_tenant_counters(metrics: Metrics, names: list[str]) -> None:
    """Every customer's counters at 0, so quiet customers show 0 rather than nothing."""
    for counter in TENANT_COUNTERS:
        metrics.declare(counter, *({"tenant": name} for name in names))
    for limit in RATE_LIMITS:
        metrics.declare(
            "smg_tenant_rate_limited_total", *({"tenant": n, "limit": limit} for n in names)
        )


class TenantGuard:
    def __init__(self, state: TenantState, metrics: Metrics, on_suspend: Any = None) -> None:
        self.state = state
        self.metrics = metrics
        self.on_suspend = on_suspend  # async (tenant, figures) -> None: hold spam, notify

    def _limited(self, tenant: Tenant, limit: str, client: str, reply: str) -> str:
        self.metrics.inc("smg_tenant_rate_limited_total", tenant=tenant.name, limit=limit)
        self.metrics.inc("smg_tenant_messages_rejected_total", tenant=tenant.name, reason=limit)
        event(log, "reject", "NOQUEUE", client=client, reason=limit, tenant=tenant.name,
              reply=reply)  # fmt: skip
        return reply

    def at_connect(self, tenant: Tenant, client: str, hostname: str) -> str | None:
        limits = tenant.limits
        over = self.state.open_session(
            tenant.name, client, limits.max_sessions, limits.max_sessions_per_ip
        )
        if over is None:
            return None
        reply = f"421 4.7.0 {hostname} Too many sessions of customer {tenant.name}, try later"
        return self._limited(tenant, over, client, reply)

    def session_ended(self, tenant: Tenant, client: str) -> None:
        self.state.close_session(tenant.name, client)

    def at_mail(self, tenant: Tenant, client: str, declared_size: int) -> str | None:
        if self.state.suspended(tenant.name):
            reply = f"451 4.7.1 Customer {tenant.name} is suspended"
            self.metrics.inc("smg_tenant_messages_rejected_total", tenant=tenant.name,
                             reason="suspended")  # fmt: skip
            event(log, "reject", "NOQUEUE", client=client, reason="suspended",
                  tenant=tenant.name, reply=reply)  # fmt: skip
            return reply
        limit = tenant.limits.messages_per_hour
        messages, _rcpts, retry = self.state.last_hour(tenant.name)
        if messages >= limit:
            reply = (f"451 4.7.1 Customer {tenant.name} reached its limit of {limit} messages"
                     f" per hour, retry after {retry} s")  # fmt: skip
            return self._limited(tenant, "messages_per_hour", client, reply)
        if declared_size > tenant.limits.max_message_size:
            return self.size_reply(tenant)
        return None

    def size_reply(self, tenant: Tenant) -> str:
        limit = tenant.limits.max_message_size
        self.metrics.inc("smg_tenant_messages_rejected_total", tenant=tenant.name, reason="size")
        return f"552 5.3.4 Message size exceeds the limit of customer {tenant.name} ({limit} bytes)"

    def at_rcpt(self, tenant: Tenant, client: str, in_transaction: int) -> str | None:
        limit = tenant.limits.recipients_per_hour
        _messages, recipients, retry = self.state.last_hour(tenant.name)
        if recipients + in_transaction >= limit:
            reply = (f"452 4.7.1 Customer {tenant.name} reached its limit of {limit} recipients"
                     f" per hour, retry after {retry} s")  # fmt: skip
            return self._limited(tenant, "recipients_per_hour", client, reply)
        return None

    async def before_queue(self, tenant: Tenant, ctx: MessageContext, decision: Decision) -> bool:
        """Count the message and its verdict, judge the window; True: queue it HELD (spam of
        a suspended customer)."""
        spam = decision.action == Action.REROUTE
        self.state.record(tenant.name, messages=1, recipients=len(ctx.rcpt_tos), seen=1,
                          spam=int(spam))  # fmt: skip
        name = tenant.name
        self.metrics.inc("smg_tenant_messages_accepted_total", tenant=name)
        self.metrics.inc("smg_tenant_bytes_total", len(ctx.data), tenant=name)
        if spam:
            self.metrics.inc("smg_tenant_spam_total", tenant=name)
        await self.judge(tenant)
        return spam and self.state.suspended(name)

    async def after_reject(self, tenant: Tenant, ctx: MessageContext, reason: str) -> None:
        self.state.record(tenant.name, seen=1, rejected=1)
        self.metrics.inc("smg_tenant_messages_rejected_total", tenant=tenant.name, reason=reason)
        if ctx.facts.get("virus"):
            self.metrics.inc("smg_tenant_virus_total", tenant=tenant.name)
        await self.judge(tenant)

    async def judge(self, tenant: Tenant) -> None:
        """Suspend the customer when its window passes a threshold (once: the worker whose
        call changed the state acts on it)."""
        limits = tenant.limits
        if not limits.suspend_min_messages:
            return
        window = self.state.window(tenant.name, limits.suspend_window)
        if window.seen < limits.suspend_min_messages:
            return
        spam_share, reject_share = window.spam / window.seen, window.rejected / window.seen
        if spam_share < limits.suspend_spam_share and reject_share < limits.suspend_reject_share:
            return
        figures = {"seen": window.seen, "spam": window.spam, "rejected": window.rejected,
                   "spam_share": f"{spam_share:.2f}", "reject_share": f"{reject_share:.2f}",
                   "window": f"{int(limits.suspend_window)}s"}  # fmt: skip
        reason = (f"automatic: {window.spam} spam and {window.rejected} rejected of "
                  f"{window.seen} messages in {int(limits.suspend_window // 60)} min")  # fmt: skip
        if not self.state.suspend(tenant.name, reason, "smg"):
            return
        event(log, "tenant_suspended", level=logging.WARNING, tenant=tenant.name, **figures)
        if self.on_suspend is not None:
            try:
                await self.on_suspend(tenant, figures, reason)
            except Exception:
                log.exception("after suspending %s", tenant.name)
