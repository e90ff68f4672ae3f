"""TLS for outbound delivery: which TLS a delivery needs, and what it got.

- :mod:`gateway.tls.levels`: the levels (opportunistic, encrypt, verify) and their order,
- :mod:`gateway.tls.rules`: the forced-TLS rules, compiled and ranked,
- :mod:`gateway.tls.mta_sts`: MTA-STS (RFC 8461) discovery, fetch and cache,
- :mod:`gateway.tls.failures`: the recent TLS failures shared by delivery and intake,
- :mod:`gateway.tls.policy`: :class:`~gateway.tls.policy.TlsPolicy` and the
  :class:`~gateway.tls.policy.TlsRequirement` it hands to delivery,
- :mod:`gateway.tls.verify`: describing and verifying an established session.
"""
