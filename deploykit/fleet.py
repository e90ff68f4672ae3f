"""The fleet: every gateway of an inventory, and the relay config each one gets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from deploykit.host import Gateway
from deploykit.problems import Problem
from deploykit.render import relay_config, to_toml


@dataclass(frozen=True)
class Fleet:
    inventory_file: str
    gateways: tuple[Gateway, ...]
    warnings: tuple[Problem, ...] = ()  # found by the validation, not refusals
    # (domain, selector) of DKIM keys left out of the relay configs: not in DNS yet (the
    # deploy looks: deploykit.dnscheck); the validation renders every key.
    held_dkim: frozenset[tuple[str, str]] = frozenset()

    def __iter__(self) -> Iterator[Gateway]:
        return iter(self.gateways)

    def get(self, name: str) -> Gateway:
        for gateway in self.gateways:
            if gateway.name == name:
                return gateway
        raise KeyError(f"{name!r} is not a gateway of {self.inventory_file}")

    @property
    def good(self) -> list[Gateway]:
        return [g for g in self.gateways if g.role == "good"]

    @property
    def bad(self) -> list[Gateway]:
        return [g for g in self.gateways if g.role == "bad"]

    @cached_property
    def relay_configs(self) -> dict[str, dict[str, Any]]:
        """Host name -> its relay config as TOML data."""
        gateways = list(self.gateways)
        return {g.name: relay_config(gateways, g, self.held_dkim) for g in self.gateways}

    def relay_toml(self, name: str) -> str:
        return to_toml(self.relay_configs[name])
