"""Loading an inventory: validated once, before pyinfra touches any host.

A pyinfra inventory (``inventories/production.py``, ``inventories/lab.py``) names the hosts in
the groups ``good`` and ``bad``; the data comes from pyinfra's ``group_data/`` files beside it
(``all.py``, ``good.py``, ``bad.py``), from a group named after the inventory file (``lab`` in
``lab.py``: what differs at that site) and from each host's own entry.  Later layers win, exactly
as in pyinfra: all < good/bad < site < host.

The inventory file ends with ``validate_inventory(__file__, globals())``: every problem is
reported at once, each naming the file and the entry, and each host's relay config is rendered
and loaded with :func:`gateway.config.parse_config`, so a value the relay would refuse never
reaches a host.  ``deploy.py`` then reads each host's values from pyinfra's ``host.data``.
Tools and tests use :func:`load_inventory`.  Nothing here makes a DKIM key: that is
``python -m deploykit dkim-keys INVENTORY`` (:mod:`deploykit.dkim_keys`).

Pure Python: no pyinfra import, so the tests use it directly.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploykit.certificates import check_tls_files
from deploykit.checks import (
    Checker,
    check_entries,
    check_fleet,
    check_relay_configs,
)
from deploykit.fleet import Fleet
from deploykit.loader import read_inventory
from deploykit.problems import InventoryError, Problem, Source

# Set in the namespace that load_inventory runs an inventory file in: the file's own
# validate_inventory() call leaves the validation to load_inventory, which reports problems
# as an exception instead of exiting.  It travels with the namespace, so nothing global
# remembers one load in the next.
_LOADED_BY_TOOL = "__deploykit_load_inventory__"


def validate_inventory(inventory_file: str | Path, namespace: Mapping[str, Any]) -> Fleet | None:
    """Validate the inventory whose module namespace is ``namespace`` (its ``globals()``).
    Called at the end of each inventory file, so a broken inventory stops pyinfra before it
    connects anywhere: the problems are printed and the process exits 1."""
    if namespace.get(_LOADED_BY_TOOL):
        return None
    try:
        fleet = check_inventory(inventory_file, namespace)
    except InventoryError as error:
        # Loaded by pyinfra: the problems are the message, a traceback would only hide them.
        print(
            f"\n{error.render()}\n\nNothing was touched: fix the inventory and run again.",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    print_warnings(fleet)
    return fleet


def print_warnings(fleet: Fleet) -> None:
    """Warnings go to stderr, one line each, and never stop the deploy."""
    for warning in fleet.warnings:
        print(f"warning: {warning.render()}", file=sys.stderr)


def check_inventory(
    inventory_file: str | Path, namespace: Mapping[str, Any], *, check_keys: bool = True
) -> Fleet:
    """The validated fleet, or :class:`InventoryError` naming file and entry for every
    mistake.  ``check_keys=False`` skips only the DKIM key files (the key maker's first look)."""
    raw = read_inventory(Path(inventory_file), namespace)
    checker = Checker(raw, check_keys=check_keys)
    checker.check_layer_keys()
    gateways = [g for g in (checker.gateway(h) for h in raw.hosts.values()) if g is not None]
    if not raw.hosts:
        checker.problem(Source(raw.file, "good"), "", "the inventory names no hosts")
    check_fleet(checker, gateways)
    for gateway in gateways:
        check_entries(checker, gateway)
        check_tls_files(checker, gateway)
    if not checker.problems:
        check_relay_configs(checker, gateways)
    if checker.problems:
        raise InventoryError(checker.problems)
    return Fleet(raw.file, tuple(gateways), tuple(checker.warnings))


def load_inventory(inventory_file: str | Path, *, check_keys: bool = True) -> Fleet:
    """Load and validate an inventory file the way pyinfra loads it (for tests and tools)."""
    path = Path(inventory_file)
    namespace: dict[str, Any] = {"__file__": str(path), _LOADED_BY_TOOL: True}
    try:
        code = compile(path.read_text(encoding="utf-8"), str(path), "exec")
    except OSError as exc:
        raise InventoryError(
            [Problem(str(path), "(file)", f"cannot read: {exc.strerror}")]
        ) from None
    exec(code, namespace)
    return check_inventory(path, namespace, check_keys=check_keys)
