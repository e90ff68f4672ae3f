"""The policy rules, one module each; ``gateway.policy.build`` puts them in order.

MAIL stage: ``relay_control``, ``sender_domain``.  RCPT stage: ``recipient`` (syntax, relay
tricks, the recipient limit), then the TLS policy's rules.  DATA stage: ``virus``, ``spam``,
then ``route``, which always decides.
"""
