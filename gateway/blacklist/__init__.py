"""Blacklist monitoring: the fleet's outbound addresses against DNS blacklists (DNSBLs).

- ``catalogue``: the lists we know, their answer codes and removal procedures (data);
- ``zones``: the configured zones with every key filled in; the config's cross-checks;
- ``answers``: query names (IPv4 octets, IPv6 nibbles) and reading answer codes;
- ``lookup``: asking the zones through ``gateway.dns.Resolver`` (with RFC 5782 test points);
- ``state``: the SQLite memory (checks, results, listings, removal requests, outbox);
- ``messages``/``notify``: notices, removal mails and ticket calls, and their delivery;
- ``check``: one run and its Nagios exit code; ``report``: what the CLI prints;
- ``units``: the systemd service and timer of the daily run.

Operators' documentation: docs/blacklist.md.
"""
