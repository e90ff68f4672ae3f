"""Monitoring on the lab (issue 15): Prometheus on the monitor gateway scrapes every target
(the targets page, in headless Chromium), every dashboard query returns series, clamd stopped
on a good gateway fires its alert and mails the operations mailbox, the bad gateway stopped
with spam queued fires its alert, and ``deploykit trace`` follows a GTUBE mail good -> bad ->
far end with three queue ids.  The lab's inventory keeps every ``for:`` at 15 s."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest

from bench.fleet import mail
from lab.config import REPO_DIR, RUN_DIR
from tests.acceptance.lab_fleet import Fleet, record, wait_for

pytestmark = pytest.mark.lab

MONITOR = "otc-de-mta01"
OPS_MAILBOX = "fmb-change@partner-plain.example"
CUSTOMER_A, PLAIN_DOMAIN = "customer-a.example", "partner-plain.example"
DASHBOARD = REPO_DIR / "dashboards" / "smg-fleet.json"
SCREENSHOT = RUN_DIR / "acceptance" / "prometheus-targets.png"


def _get(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def prometheus(fleet: Fleet) -> str:
    return f"http://{fleet.gateways[MONITOR].address}:9090"


def query(fleet: Fleet, expr: str) -> list[dict]:
    url = f"{prometheus(fleet)}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = _get(url)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def firing(fleet: Fleet, alertname: str, gateway: str) -> bool:
    url = f"http://{fleet.gateways[MONITOR].address}:9093/api/v2/alerts?active=true"
    alerts = _get(url)
    return any(
        a["labels"].get("alertname") == alertname and a["labels"].get("gateway") == gateway
        for a in alerts
    )


def all_targets_up(fleet: Fleet) -> bool:
    targets = _get(f"{prometheus(fleet)}/api/v1/targets")["data"]["activeTargets"]
    return len(targets) == 2 * len(fleet.gateways) + 2 and all(t["health"] == "up" for t in targets)


def test_targets_page_shows_every_target_up(fleet: Fleet) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (scripts/setup.sh)")
    wait_for("every target up", lambda: all_targets_up(fleet), 90, 2)
    # Debian's Prometheus serves the server-rendered (classic) UI.
    url = f"{prometheus(fleet)}/classic/targets"
    headless = [chromium, "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run([*headless, "--dump-dom", url], capture_output=True, text=True,
                         timeout=90, check=True).stdout  # fmt: skip
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*headless, "--window-size=1400,1800", f"--screenshot={SCREENSHOT}", url],
                   capture_output=True, timeout=90, check=True)  # fmt: skip
    assert SCREENSHOT.stat().st_size > 10000
    count = len(fleet.gateways)
    for job, n in (("smg", count), ("node", count), ("prometheus", 1), ("alertmanager", 1)):
        headers = re.findall(r"[a-z]+ \(\d+/\d+ up\)", dom)
        assert f"{job} ({n}/{n} up)" in dom, f"{job}: {headers}"
    states = re.findall(r'state_indicator text-uppercase">(\w+)<', dom)
    assert states == ["up"] * (2 * count + 2), states
    for name in fleet.gateways:
        assert f'gateway="{name}"' in dom
    record("monitoring: targets page", f"{len(states)} targets up; screenshot {SCREENSHOT}")


def _dashboard_queries() -> list[tuple[str, str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    row, out = "", []
    for panel in panels:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        for target in panel["targets"]:
            expr = target["expr"].replace("$gateway", ".*").replace("$tenant", ".*")
            out.append((row, panel["title"], expr))
    return out


def _traffic(fleet: Fleet) -> None:
    """Counters the dashboard shows exist once something happened: a ham, a GTUBE, a refusal,
    and the blacklist check has written its textfile."""
    for kind in ("ham", "spam"):
        tag = mail.new_tag(f"dash-{kind}")
        fleet.send(
            fleet.gateways[MONITOR], kind, tag, f"alice@{CUSTOMER_A}", f"{tag}@{PLAIN_DOMAIN}"
        )
    fleet.swaks(fleet.gateways[MONITOR], "x@no-such-domain.invalid", f"y@{PLAIN_DOMAIN}")
    fleet.gateways[MONITOR].run("systemctl start smg-blacklist.service", timeout=300)


def test_dashboard_queries_return_series(fleet: Fleet) -> None:
    _traffic(fleet)
    queries = [q for q in _dashboard_queries() if not q[0].startswith("Customer")]

    def empty() -> list[str]:
        return [
            f"{row} / {title}: {expr}" for row, title, expr in queries if not query(fleet, expr)
        ]

    try:
        wait_for("every dashboard query to return series", lambda: not empty(), 60, 5)
    except AssertionError:
        missing = empty()
        raise AssertionError("queries without series:\n" + "\n".join(missing)) from None
    record("monitoring: dashboard queries", f"{len(queries)} fleet/gateway queries return series")


def test_dashboard_customer_queries_return_series(fleet: Fleet) -> None:
    queries = [q for q in _dashboard_queries() if q[0].startswith("Customer")]
    if not query(fleet, "smg_tenant_messages_accepted_total"):
        pytest.skip("no smg_tenant_* series in the lab: issue 11's tenant metrics are not deployed")
    for _, _, expr in queries:
        query(fleet, expr)  # valid PromQL (status success)
    empty = [f"{title}: {expr}" for _, title, expr in queries if not query(fleet, expr)]
    assert not empty, empty


def _alert_latency(fleet: Fleet, alertname: str, gateway: str, timeout: float = 180) -> float:
    started = time.monotonic()
    wait_for(f"{alertname} for {gateway} in Alertmanager",
             lambda: firing(fleet, alertname, gateway), timeout, 2)  # fmt: skip
    return time.monotonic() - started


def test_clamd_down_fires_and_mails_operations(fleet: Fleet) -> None:
    gateway = fleet.gateways["otc-de-mta02"]
    started = time.monotonic()
    # The socket too: clamd is socket-activated, a ping would start it again.
    gateway.systemctl("stop", "clamav-daemon.socket clamav-daemon.service")
    try:
        fired = _alert_latency(fleet, "SmgClamdUnavailable", gateway.name)
        ops = fleet.wait_arrival(
            "the alert mail in the operations mailbox",
            lambda a: a.recipient == OPS_MAILBOX and "SmgClamdUnavailable" in a.subject,
            timeout=180,
        )
        mailed = time.monotonic() - started
    finally:
        gateway.systemctl("start", "clamav-daemon.socket clamav-daemon.service")
    assert gateway.name in ops.read().decode(errors="replace")
    record("monitoring: clamd stopped -> alert firing (s)", round(fired, 1))
    record("monitoring: clamd stopped -> mail in the ops mailbox (s)", round(mailed, 1))


def test_bad_gateway_down_with_spam_queued_fires(fleet: Fleet) -> None:
    good, bad = fleet.gateways[MONITOR], fleet.bad
    bad.systemctl("stop", "smg.service")
    try:
        tag = mail.new_tag("bad-down")
        sent = fleet.send(good, "spam", tag, f"alice@{CUSTOMER_A}", f"{tag}@{PLAIN_DOMAIN}")
        assert sent.accepted, sent.transcript
        fired = _alert_latency(fleet, "SmgBadGatewayUnreachable", good.name)
        relay_down = _alert_latency(fleet, "SmgRelayDown", bad.name)
    finally:
        bad.systemctl("start", "smg.service")
    wait_for("the bad gateway listening", bad.listening, 60, 1)
    good.flush()  # the deferred spam is due now rather than at its next retry
    fleet.arrived(tag, timeout=180)  # the queued spam drains once the bad gateway is back
    record("monitoring: bad gateway stopped -> SmgBadGatewayUnreachable (s)", round(fired, 1))
    record("monitoring: then SmgRelayDown for the bad gateway (s)", round(relay_down, 1))


def test_trace_gtube_good_bad_far_end(fleet: Fleet) -> None:
    tag = mail.new_tag("trace")
    sender = f"alice@{CUSTOMER_A}"
    sent = fleet.send(fleet.gateways[MONITOR], "spam", tag, sender, f"{tag}@{PLAIN_DOMAIN}")
    assert sent.accepted, sent.transcript
    fleet.arrived(tag, timeout=120)
    command = [sys.executable, "-m", "deploykit", "trace", "inventories/lab.py",
               "--message-id", f"<{tag}@{CUSTOMER_A}>", "--since", "30m", "--json"]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["errors"] == []
    (message,) = result["messages"]
    hosts = [h["host"] for h in message["hops"]]
    # the good gateway spreads spam over the bad gateways: either may carry it out
    assert hosts[0] == MONITOR and len(hosts) == 2, message
    assert hosts[1] in {bad.name for bad in fleet.bads}, message
    (far,) = message["far_end"]
    ids = [h["queue_id"] for h in message["hops"]] + [far["queue_id"]]
    assert len(set(ids)) == 3 and all(ids), ids
    assert "spam" in (message["hops"][0]["verdicts"] or ""), message["hops"][0]
    assert far["reply"].startswith("250")
    record("monitoring: trace GTUBE queue ids", " -> ".join(ids))
    record("monitoring: deploykit trace took (s)", round(took, 1))
