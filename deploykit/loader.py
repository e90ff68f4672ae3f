"""Reading an inventory file and its ``group_data/`` layers by the same rules as pyinfra's CLI.

The groups of the inventory file (a list of hosts, or ``(hosts, data)``), a group named after
the file (the site: ``lab`` in ``lab.py``), and ``group_data/*.py`` in the working directory and
beside the inventory.  Nothing is checked here beyond the shape pyinfra needs; a file that
cannot be read is a :class:`~deploykit.problems.Problem`.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.problems import Problem, Source


@dataclass
class Layer:
    source: Source
    data: dict[str, Any]


@dataclass
class RawHost:
    name: str
    entry: Source
    data: dict[str, Any]
    groups: list[str] = field(default_factory=list)


@dataclass
class RawInventory:
    file: str
    hosts: dict[str, RawHost]
    group_layers: dict[str, list[Layer]]  # group -> layers, later ones win
    group_order: list[str]  # pyinfra's order: the file's groups, then the site group
    problems: list[Problem] = field(default_factory=list)


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _is_group(name: str, value: Any) -> bool:
    if name.startswith("_"):
        return False
    hosts = value[0] if isinstance(value, tuple) and value else value
    return isinstance(hosts, list) and all(isinstance(h, (str, tuple)) for h in hosts)


def read_inventory(path: Path, namespace: Mapping[str, Any]) -> RawInventory:
    file = display_path(path)
    raw = RawInventory(file=file, hosts={}, group_layers={}, group_order=[])
    inline: dict[str, dict[str, Any]] = {}
    for name, value in namespace.items():
        if not _is_group(name, value):
            continue
        members, data = (value[0], value[1]) if isinstance(value, tuple) else (value, {})
        if not isinstance(data, dict):
            raw.problems.append(Problem(file, name, "group data must be a dict"))
            data = {}
        inline[name] = data
        if name != "all":
            raw.group_order.append(name)
        for index, member in enumerate(members):
            _add_member(raw, name, index, member)
    site = path.stem
    if site not in raw.group_order:
        raw.group_order.append(site)
    for group in [*raw.group_order, "all"]:
        layers = raw.group_layers.setdefault(group, [])
        if inline.get(group):
            layers.append(Layer(Source(file, f"group {group} (data in the inventory)"), {}))
            layers[-1].data = dict(inline[group])
    for folder in _group_data_folders(path):
        for file_path in sorted(folder.glob("*.py")):
            group = file_path.stem
            data = _exec_data_file(file_path, raw)
            layers = raw.group_layers.setdefault(group, [])
            layers.append(Layer(Source(display_path(file_path), f"group {group}"), data))
    return raw


def _add_member(raw: RawInventory, group: str, index: int, member: Any) -> None:
    if isinstance(member, tuple):
        if len(member) != 2 or not isinstance(member[0], str) or not isinstance(member[1], dict):
            raw.problems.append(
                Problem(raw.file, f"{group}[{index}]", "expected 'name' or ('name', {data})")
            )
            return
        name, data = member
    else:
        name, data = member, {}
    host = raw.hosts.get(name)
    if host is None:
        entry = Source(raw.file, f"{group}[{index}] {name}")
        host = raw.hosts[name] = RawHost(name, entry, {})
    if data:
        if host.data:
            raw.problems.append(
                Problem(
                    raw.file,
                    f"{group}[{index}] {name}",
                    f"the host's data is given twice (also at {host.entry.entry})",
                )
            )
        else:
            host.data, host.entry = dict(data), Source(raw.file, f"{group}[{index}] {name}")
    if group != "all" and group not in host.groups:
        host.groups.append(group)


def _group_data_folders(inventory: Path) -> list[Path]:
    """pyinfra reads ``group_data/`` in the working directory and beside the inventory."""
    folders = [Path.cwd() / "group_data", inventory.resolve().parent / "group_data"]
    unique = []
    for folder in folders:
        if folder.is_dir() and folder.resolve() not in [f.resolve() for f in unique]:
            unique.append(folder)
    return unique


def _exec_data_file(path: Path, raw: RawInventory) -> dict[str, Any]:
    """A group data file's top-level names, minus imports and dunders (as pyinfra does)."""
    text = path.read_text(encoding="utf-8")
    namespace: dict[str, Any] = {"__file__": str(path)}
    try:
        exec(compile(text, str(path), "exec"), namespace)
    except Exception as exc:
        raw.problems.append(Problem(display_path(path), "(file)", f"cannot load: {exc!r}"))
        return {}
    imported = _imported_names(text)
    if "__all__" in namespace:
        keys = set(namespace["__all__"])
        return {k: v for k, v in namespace.items() if k in keys}
    return {k: v for k, v in namespace.items() if not k.startswith("__") and k not in imported}


def _imported_names(text: str) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(text).body:
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update((a.asname or a.name) for a in node.names if a.name != "*")
    return names
