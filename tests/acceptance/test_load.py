"""A modest load through the fleet (the full run is ``make load``, bench/fleet/load.py):
mixed ham, spam and viruses from the customer host over 12 sessions to both good gateways.
Everything that got a 250 arrives at the far ends (count equal to what was accepted), from
the right IPs, and each virus was refused with 554 and answered with an NDR.

The figures are printed and written to lab/run/acceptance/load-summary.json.
"""

from __future__ import annotations

import json

import pytest

from bench.fleet.load import Fleet as LoadFleet
from bench.fleet.load import LoadPlan, format_summary, run_load
from bench.fleet.sink import CustomerMailServer
from lab.config import RUN_DIR
from tests.acceptance.lab_fleet import Fleet, record

pytestmark = pytest.mark.lab

MESSAGES = 600


def test_mixed_load_through_the_fleet(fleet: Fleet, customer_mail: CustomerMailServer) -> None:
    plan = LoadPlan(
        messages=MESSAGES, connections=12, gateways=[g.address for g in fleet.good],
        netns=fleet.netns, send_timeout=300, arrival_timeout=180,
    )  # fmt: skip
    summary = run_load(plan, LoadFleet(fleet.state), customer_mail.maildir)
    out = RUN_DIR / "acceptance" / "load-summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    latency = summary["latency_ms"]
    record(
        "load",
        f"{MESSAGES} messages over 12 sessions: {summary['results']}; "
        f"{summary['accepted_per_second']} msg/s accepted, {summary['delivered']} delivered "
        f"({summary['delivered_per_second']} msg/s end to end); 250 latency p50 "
        f"{latency['p50']} ms, p99 {latency['p99']} ms",
    )
    checks, by_kind = summary["checks"], summary["by_kind"]
    assert summary["results"] == {
        "accepted": by_kind["ham"].get("accepted", 0) + by_kind["spam"].get("accepted", 0),
        "rejected": by_kind["virus"].get("rejected", 0),
    }, summary["examples"]
    assert summary["delivered"] == summary["results"]["accepted"], "far ends == accepted"
    assert checks["ok"], checks
    assert checks["duplicates"] == 0
    assert checks["ndrs_received"] == checks["ndrs_expected"] == by_kind["virus"]["rejected"]
