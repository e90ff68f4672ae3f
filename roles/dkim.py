"""dkim: the signing keys, made once on the control machine (``python -m gateway.inventory
dkim-keys INVENTORY`` runs ``smg dkim keygen``), copied 0600 owner smg to the good gateways.
A key the inventory no longer names is removed from the host."""

from __future__ import annotations

from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import FindFiles
from pyinfra.operations import files

from gateway.inventory import Gateway, HostPaths, dkim_entry, dkim_key_path

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
    return wanted


@deploy("dkim: signing keys")
def apply(gateway: Gateway) -> list[OperationMeta]:
    """Returns the operations whose change the relay must be reloaded for."""
    wanted = wanted_keys(gateway)
    present = host.get_fact(FindFiles, path=HostPaths.DKIM_DIR, maxdepth=1) or []
    files.directory(
        name=f"directory {HostPaths.DKIM_DIR}",
        path=HostPaths.DKIM_DIR,
        user=USER,
        group=USER,
        mode="700",
    )
    changes = [
        files.put(
            name=f"dkim: {Path(dest).name}",
            src=str(src),
            dest=dest,
            user=USER,
            group=USER,
            mode="600",
        )
        for dest, src in sorted(wanted.items())
    ]
    for stale in sorted(set(present) - set(wanted)):
        changes.append(files.file(name=f"dkim: remove {stale}", path=stale, present=False))
    return changes
