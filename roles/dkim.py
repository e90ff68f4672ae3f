"""dkim: the signing keys, made once on the control machine (``python -m deploykit
dkim-keys INVENTORY`` runs ``smg dkim keygen``), copied 0600 owner smg to the good gateways.
A key the inventory no longer names is removed from the host."""

from __future__ import annotations

from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import FindFiles

from deploykit.host import Gateway
from deploykit.paths import HostPaths
from deploykit.schema import dkim_entry, dkim_key_path, tenant_dkim
from roles import ops

USER = HostPaths.USER


def wanted_keys(gateway: Gateway) -> dict[str, Path]:
    """Host path -> control machine path of every key this gateway signs with."""
    keys_dir = Path(gateway["dkim_keys_dir"])
    wanted = {}
    for item in gateway["dkim_domains"]:
        entry = dkim_entry(item)
        if isinstance(entry, str):  # validation refused it already
            continue
        domain, selector, _ = entry
        wanted[HostPaths.dkim_key(domain, selector)] = dkim_key_path(keys_dir, domain, selector)
    for domain, selector, _ in tenant_dkim(gateway["tenants"]):
        wanted[HostPaths.dkim_key(domain, selector)] = dkim_key_path(keys_dir, domain, selector)
    return wanted


def key_files(gateway: Gateway, present: list[str]) -> list[ops.Wanted]:
    wanted = wanted_keys(gateway)
    items: list[ops.Wanted] = [ops.Directory(HostPaths.DKIM_DIR, USER, USER, "700")]
    items += [
        ops.File(dest, src=src, user=USER, group=USER, mode="600")
        for dest, src in sorted(wanted.items())
    ]
    items += [ops.Absent(stale) for stale in sorted(set(present) - set(wanted))]
    return items


@deploy("dkim: signing keys")
def apply(gateway: Gateway) -> list[OperationMeta]:
    """Returns the operations whose change the relay must be reloaded for."""
    present = host.get_fact(FindFiles, path=HostPaths.DKIM_DIR, maxdepth=1) or []
    return [ops.ensure(name="dkim: keys (0600 smg), none other", items=key_files(gateway, present))]
