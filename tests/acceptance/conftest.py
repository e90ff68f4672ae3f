"""Fixtures for the fleet acceptance suite (docs/acceptance.md): the deployed lab fleet.

Needs the lab up (``make lab-up``) and deployed (``make deploy``). Built on tests/infra's lab
fixtures: as there, the tests skip with the reason when not root or when the lab is not up or
not deployed, and with ``CI=true`` a missing or undeployed lab is a failure.

Session fixtures: ``fleet`` (tests/acceptance/lab_fleet.py) and ``customer_mail``, the
customer's own mail server on the customer host (198.51.100.30:25, the MX of
customer-a.example), which receives the NDRs. Before each test, ``fleet_healthy`` checks (and
if a failed fault test left something stopped, restores) every relay, scanner and far end, so
one failure never cascades.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fleet.sink import CustomerMailServer
from lab import dns as lab_dns
from lab import farend as lab_farend
from lab.config import REPO_DIR, RUN_DIR, host_by_name
from lab.zones import default_zones
from tests.acceptance.lab_fleet import FIGURES, RELAY_UNIT, Fleet, wait_for
from tests.infra.conftest import lab_host, lab_state  # noqa: F401 - fixtures used here

SCANNERS = ("clamav-daemon.service", "rspamd.service")
DKIM_RECORDS = REPO_DIR / "keys" / "lab" / "dns-records.txt"
WORKDIR = RUN_DIR / "acceptance"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"deployed lab fleet required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def customer_mail(lab_state: dict[str, Any]) -> Iterator[CustomerMailServer]:  # noqa: F811
    """The customer's mail server (gets the NDRs); its Maildir is ``.maildir``."""
    customer = lab_state["customer"]
    sink = CustomerMailServer(customer["netns"], customer["address"], WORKDIR / "customer-mail")
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def fleet(
    lab_state: dict[str, Any],  # noqa: F811
    lab_host: Any,  # noqa: F811
    customer_mail: CustomerMailServer,
) -> Fleet:
    fleet = Fleet(lab_state, lab_host, customer_mail.maildir)
    not_running = [g.name for g in fleet.gateways.values() if not g.is_active(RELAY_UNIT)]
    if not_running:
        _unavailable(
            f"the relay is not running on {', '.join(not_running)}: deploy the lab first "
            "(`make deploy`, i.e. pyinfra inventories/lab.py deploy.py -y)"
        )
    publish_dkim_records()
    for gateway in fleet.good:
        wait_for(f"SMTP on {gateway.name}", lambda g=gateway: g.smtp_ready(fleet.netns), 30, 1)
    return fleet


def publish_dkim_records(records: Path = DKIM_RECORDS) -> list[str]:
    """Put the DKIM TXT records the deploy wrote (keys/lab/dns-records.txt) into the lab's
    customer zones, as the customers do with theirs; only where the served one differs."""
    if not records.is_file():
        return []
    lines = [
        line.strip()
        for line in records.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(";")
    ]
    changed = []
    zones = default_zones()
    for zone, text in zones.items():
        mine = [line for line in lines if line.split()[0].rstrip(".").endswith("." + zone)]
        if not mine or all(_served(line) for line in mine):
            continue
        extra = [line for line in mine if line not in text]  # lab.zones serves the kit's own
        lab_dns.set_zone(zone, text + "".join(f"{line}\n" for line in extra))
        changed.append(zone)
    return changed


def _served(record_line: str) -> bool:
    """Is exactly this TXT record (owner and text) what the lab DNS serves?"""
    owner = record_line.split()[0]
    wanted = "".join(re.findall(r'"([^"]*)"', record_line))
    answer = lab_dns.query(owner, "TXT").answer
    served = {b"".join(r.strings).decode() for rrset in answer for r in rrset}
    return wanted in served


@pytest.fixture(autouse=True)
def fleet_healthy(request: pytest.FixtureRequest) -> None:
    """Before each test that uses the fleet: every relay, scanner and far end is up."""
    if "fleet" not in request.fixturenames:
        return
    fleet: Fleet = request.getfixturevalue("fleet")
    restored = restore_fleet(fleet)
    if restored:  # an earlier test failed half-way: say so, then go on
        warnings.warn(f"fleet restored before {request.node.name}: {restored}", stacklevel=1)


def restore_fleet(fleet: Fleet) -> list[str]:
    """Start whatever is stopped (a fault test that failed half-way); returns what it did."""
    done = []
    for name, facts in fleet.state["far_ends"].items():
        if not lab_farend.smtp_answers(facts["address"]):
            host = host_by_name(name)
            lab_farend.stop(host)
            lab_farend.start(host)
            lab_farend.wait_ready(host)
            done.append(f"started far end {name}")
    for gateway in fleet.gateways.values():
        units = (RELAY_UNIT, *SCANNERS) if gateway.role == "good" else (RELAY_UNIT,)
        for unit in gateway.inactive(units):
            gateway.systemctl("start", unit)
            gateway.wait_active(unit)
            done.append(f"started {unit} on {gateway.name}")
        if f"started {RELAY_UNIT} on {gateway.name}" in done:
            wait_for(f"{gateway.name} to listen", gateway.listening, 60, 0.5)
    return done


# The mechanisms first (the quickest proof that the deploy works), the faults last (they stop
# and restart parts of the fleet).
MODULE_ORDER = ("test_mechanisms", "test_bad_input", "test_load", "test_faults")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent

    def rank(item: pytest.Item) -> int:
        path = Path(str(item.fspath))
        if path.parent != here:
            return -1  # other suites in the same run keep their place, before this one
        stem = path.stem
        return MODULE_ORDER.index(stem) if stem in MODULE_ORDER else len(MODULE_ORDER)

    items.sort(key=rank)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures the tests measured (fault timings, flood counts, load), also written to
    lab/run/acceptance/figures.json for docs/acceptance.md."""
    if not FIGURES:
        return
    terminalreporter.write_sep("-", "acceptance figures")
    for name, value in FIGURES.items():
        text = value if isinstance(value, str) else json.dumps(value)
        terminalreporter.write_line(f"{name}: {text}")
    WORKDIR.mkdir(parents=True, exist_ok=True)
    (WORKDIR / "figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")
