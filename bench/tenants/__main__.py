"""``python -m bench.tenants [--tenants 500] [--networks-per-tenant 4]``: the cost of the tenant
lookups one message makes, on a table of that size.

Per message the relay looks up the client's tenant by address once (at connect) and the owner
of the sender domain (MAIL FROM and From:).  The table is built from a generated smg.toml
(through the config loader, so the checks run too: their time is printed as well).
"""

from __future__ import annotations

import argparse
import random
import time

from bench.tenants.config import generated_config
from gateway.config import parse_config
from gateway.tenants import TenantTable


def _per_call(fn, items: list[str], repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tenants")
    parser.add_argument("--tenants", type=int, default=500)
    parser.add_argument("--networks-per-tenant", type=int, default=4)
    parser.add_argument("--lookups", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    data = generated_config(args.tenants, args.networks_per_tenant)
    start = time.perf_counter()
    config = parse_config(data, "<bench>")
    load_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    table = TenantTable.from_config(config)
    build_ms = (time.perf_counter() - start) * 1000
    rng = random.Random(11)
    networks = [n for t in config.tenants for n in t.networks]
    hits = [str(rng.choice(networks)[rng.randrange(0, 8)]) for _ in range(args.lookups)]
    v6 = [f"2001:db8:{rng.randrange(args.tenants):x}::{rng.randrange(1, 999):x}"
          for _ in range(args.lookups)]  # fmt: skip
    misses = [f"203.0.113.{rng.randrange(256)}" for _ in range(args.lookups)]
    domains = [f"mail.t{rng.randrange(args.tenants)}.example" for _ in range(args.lookups)]
    by_address = _per_call(table.by_address, hits, args.repeat)
    by_v6 = _per_call(table.by_address, v6, args.repeat)
    miss = _per_call(table.by_address, misses, args.repeat)
    owner = _per_call(table.owner, domains, args.repeat)
    per_message = by_address + 2 * owner
    print(f"tenants {len(table)}, networks {len(networks)}; config load+checks {load_ms:.0f} ms,"
          f" table build {build_ms:.1f} ms")  # fmt: skip
    print(f"{'lookup':32} {'us/call':>8}")
    for label, value in (("by address (IPv4, hit)", by_address), ("by address (IPv6, hit)", by_v6),
                         ("by address (miss)", miss), ("domain owner", owner),
                         ("per message (1 address + 2 owners)", per_message)):  # fmt: skip
        print(f"{label:32} {value:8.2f}")
    print(f"bound 20 us per message: {'OK' if per_message < 20 else 'EXCEEDED'}")
    return 0 if per_message < 20 else 1


if __name__ == "__main__":
    raise SystemExit(main())
