"""DKIM keys on the control machine: made only on purpose, never by loading an inventory.

``python -m deploykit dkim-keys INVENTORY`` makes each key a good gateway signs with that does
not exist yet (``smg dkim keygen``; an existing key is never touched: it may be in DNS) and
writes ``dns-records.txt``, the TXT records each customer publishes before the deploy that
starts signing with its key.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from deploykit.fleet import Fleet
from deploykit.schema import dkim_entry, dkim_key_path, tenant_dkim
from gateway.dkim import dns_record_value, load_private_key, zone_line


def dkim_wanted(fleet: Fleet) -> dict[tuple[str, str], tuple[str, Path]]:
    """(domain, selector) -> (algorithm, keys dir) for every key a good gateway signs with."""
    wanted: dict[tuple[str, str], tuple[str, Path]] = {}
    for gateway in fleet.good:
        for item in gateway["dkim_domains"]:
            entry = dkim_entry(item)
            if not isinstance(entry, str):
                domain, selector, algorithm = entry
                wanted[(domain, selector)] = (algorithm, Path(gateway["dkim_keys_dir"]))
        # each customer's own keys (tenants[].dkim), made the same way
        for domain, selector, algorithm in tenant_dkim(gateway["tenants"]):
            wanted[(domain, selector)] = (algorithm, Path(gateway["dkim_keys_dir"]))
    return wanted


def make_dkim_keys(fleet: Fleet, out: Callable[[str], None] = print) -> list[Path]:
    """Make the keys that do not exist yet with ``smg dkim keygen`` (existing keys are never
    touched: they may be in DNS), then write ``dns-records.txt`` in each keys directory."""
    made = []
    for (domain, selector), (algorithm, keys_dir) in sorted(dkim_wanted(fleet).items()):
        path = dkim_key_path(keys_dir, domain, selector)
        if path.exists():
            continue
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "gateway.cli",
            "dkim",
            "keygen",
            "--domain",
            domain,
            "--selector",
            selector,
            "--algorithm",
            algorithm,
            "--out",
            str(keys_dir),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=120)
        out(f"made {path}")
        made.append(path)
    for keys_dir, text in dns_records(fleet).items():
        target = keys_dir / "dns-records.txt"
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            out(f"wrote {target}")
    return made


def dns_records(fleet: Fleet) -> dict[Path, str]:
    """The TXT records customers publish, per keys directory, as zone-file lines."""
    files: dict[Path, list[str]] = {}
    for (domain, selector), (_, keys_dir) in sorted(dkim_wanted(fleet).items()):
        key = load_private_key(dkim_key_path(keys_dir, domain, selector))
        lines = files.setdefault(keys_dir, [_DNS_HEADER])
        lines.append(zone_line(f"{selector}._domainkey.{domain}", dns_record_value(key)))
    return {d: "\n".join(lines) + "\n" for d, lines in files.items()}


_DNS_HEADER = (
    "; DKIM public keys of the Secure Mail Gateway: each customer publishes the line of its\n"
    "; domain in its zone before the deploy that starts signing with it.  Written by\n"
    "; python -m deploykit dkim-keys; the private keys beside this file never leave\n"
    "; the control machine except to the good gateways."
)
