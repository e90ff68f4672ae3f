"""Fixtures for tests against the lab fleet (`python -m lab up`, see docs/lab.md).

The lab is brought up outside pytest (it takes seconds warm, a minute cold, and its hosts are
the deploy's target). When it is not up these tests skip with the reason, except in CI
(CI=true), where a missing lab is a failure. Without root they skip (the lab is root's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import testinfra

from lab import fleet
from lab.config import GATEWAYS, STATE_FILE

GATEWAY_NAMES = [h.name for h in GATEWAYS]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"lab fleet required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lab_state() -> dict[str, Any]:
    """lab/run/state.json of the running lab (format: docs/lab.md)."""
    if os.geteuid() != 0:
        # The one skip allowed in CI too: the lab's key and namespaces belong to root.
        pytest.skip("the lab fleet needs root (its SSH key and network namespaces)")
    if not fleet.is_up():
        _unavailable(
            f"the lab is not up ({STATE_FILE} missing or stale): run "
            "`sudo .venv/bin/python -m lab up`"
        )
    return json.loads(Path(STATE_FILE).read_text())


@pytest.fixture(scope="session")
def lab_host(lab_state: dict[str, Any]) -> Callable[[str], testinfra.host.Host]:
    """lab_host("otc-de-mta01") -> a testinfra host over paramiko (fast, no ControlMaster)."""
    cache: dict[str, testinfra.host.Host] = {}

    def get(name: str) -> testinfra.host.Host:
        if name not in cache:
            address = lab_state["hosts"][name]["address"]
            spec = f"paramiko://root@{address}?ssh_config={lab_state['ssh_config']}&timeout=10"
            cache[name] = testinfra.get_host(spec)
        return cache[name]

    return get


@pytest.fixture(params=GATEWAY_NAMES)
def gateway(request: pytest.FixtureRequest, lab_host: Callable[[str], Any]) -> Any:
    """Each gateway host in turn (testinfra Host, with .lab_name set)."""
    host = lab_host(request.param)
    host.lab_name = request.param
    return host
