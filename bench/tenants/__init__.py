"""Micro-benchmark of the tenant lookups a message costs (issue 11): ``python -m bench.tenants``."""
