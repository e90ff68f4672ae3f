"""Data for the bad gateway(s): they send what the good gateways classified as spam.

SMTP into a bad gateway is allowed only from the good gateways (their public addresses, from
the inventory), so there is nothing to set here for routing.  Relay settings only the bad
gateways need go into ``relay_settings``.
"""

relay_settings = {}
