"""One gateway host as the deploy sees it: its name, its role and every inventory key's value.

The validator builds it from the inventory's layers; ``deploy.py`` builds it from pyinfra's
``host.data``, which layers group data and host data the same way.  Either way each value has
gone through its key's parser (:data:`deploykit.schema.KEYS`), with the key's default where
nothing sets it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deploykit.problems import Source
from deploykit.schema import KEYS, ROLES


@dataclass(frozen=True)
class Gateway:
    name: str
    role: str
    settings: Mapping[str, Any]  # every key of KEYS, parsed, merged by precedence
    entry: Source  # the host's own entry
    sources: Mapping[str, Source] = field(default_factory=dict)  # where each set key came from
    connection: Mapping[str, Any] = field(default_factory=dict)  # pyinfra's ssh_* data

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]

    @property
    def public_address(self) -> str:
        return self.settings["public_address"]

    @property
    def listen_address(self) -> str:
        """Where the relay listens (port 25): the private address behind NAT."""
        return self.settings["listen_address"] or self.public_address

    @property
    def source_address(self) -> str:
        """Where the relay sends from, and what the fleet's peers see (same private net)."""
        return self.settings["source_address"] or self.listen_address

    @property
    def fqdn(self) -> str:
        return self.settings["fqdn"]

    @property
    def runs_blacklist_monitor(self) -> bool:
        return self.name in self.settings["blacklist_monitor_hosts"]


def gateway_from_host_data(name: str, groups: Iterable[str], data: Mapping[str, Any]) -> Gateway:
    """The gateway as pyinfra sees it: ``groups`` and ``data`` are ``host.groups`` and
    ``host.data.dict()``.  The inventory was validated when pyinfra loaded it, so every value
    parses; a value that does not raises here rather than reach a host."""
    roles = [group for group in groups if group in ROLES]
    if len(roles) != 1:
        raise ValueError(f"{name} is in {roles or 'no role group'}: validation should have said")
    settings = {
        key: spec.parse(data[key]) if key in data else spec.default_value()
        for key, spec in KEYS.items()
    }
    connection = {key: value for key, value in data.items() if key.startswith("ssh_")}
    entry = Source("pyinfra host data", name)
    return Gateway(name, roles[0], settings, entry, connection=connection)
