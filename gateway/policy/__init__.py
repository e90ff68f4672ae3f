"""Policy as small named rules feeding one chain that ends in one action.

Like Mailman's chains: each rule looks at one thing and returns a :class:`RuleResult`; the chain
runs the rules of a stage in order and stops at the first one that decides (reject or hold).  A
rule that only records facts (the spam score, say) returns no action and the chain goes on.  The
last rule of the data stage (``route``) always decides: accept (deliver directly from this
gateway) or reroute (relay to the bad gateway).

The intake runs the ``mail`` stage at MAIL FROM, the ``rcpt`` stage at each RCPT TO and the
``data`` stage at the end of DATA; ``smg explain`` runs all three on a message without sending.
"""

from gateway.policy.chain import (
    Action,
    Chain,
    Decision,
    MessageContext,
    Reply,
    Rule,
    RuleResult,
    Stage,
)

__all__ = [
    "Action",
    "Chain",
    "Decision",
    "MessageContext",
    "Reply",
    "Rule",
    "RuleResult",
    "Stage",
]
