"""Customers as tenants (issue 11): who a client is, what it may send, its limits and state.

- :mod:`gateway.tenants.table`: the tenant table (longest-prefix match of client addresses,
  AUTH users, domain ownership), built from ``[[tenants]]``;
- :mod:`gateway.tenants.state`: ``<spool>/tenants.sqlite``, shared by the workers: sessions,
  hourly windows, the verdict window and the suspension state.

See docs/tenants.md.
"""

from gateway.tenants.table import PrefixTable, Tenant, TenantTable

__all__ = ["PrefixTable", "Tenant", "TenantTable"]
