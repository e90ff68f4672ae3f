"""The monitoring the kit ships (issue 15): every alert rule passes its ``promtool test rules``
test (tests/monitoring/*.test.yml) with the shipped windows, the inventory's alert_for windows
render, the rendered prometheus.yml passes ``promtool check config`` and alertmanager.yml
``amtool check-config``; the firewall opens the scraped ports to the monitoring host only; the
relay's metrics leave loopback only with a monitoring host; bad monitoring keys are refused."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from deploykit.fleet import Fleet
from deploykit.render import relay_config
from roles import blacklist, firewall, monitoring
from tests.harness import TestCA
from tests.unit.test_inventory import Site, one
from tests.unit.test_inventory_roles import nft_check

REPO = Path(__file__).resolve().parents[2]
RULE_TESTS = sorted((REPO / "tests" / "monitoring").glob("*.test.yml"))
DOCS = REPO / "docs" / "monitoring.md"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (scripts/setup.sh installs it)")
    return path


def _run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("site")
    site = Site(root, TestCA(root / "ca"))
    site.all["monitoring_host"] = "otc-de-mta01"
    return site


@pytest.fixture(scope="module")
def fleet(site: Site) -> Fleet:
    return site.load()


def test_every_alert_has_a_promtool_test_and_a_runbook() -> None:
    names = monitoring.alert_names()
    assert len(names) >= 18
    tested = set()
    for path in RULE_TESTS:
        tested |= set(re.findall(r"alertname: (\w+)", path.read_text()))
    assert set(names) - tested == set()
    headings = set(re.findall(r"^#+ (\w+)$", DOCS.read_text(), re.M))
    assert [n for n in names if n not in headings] == []


def test_promtool_test_rules(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    (tmp_path / "smg-rules.yml").write_text(monitoring.render_rules({}))
    for path in RULE_TESTS:
        shutil.copy(path, tmp_path / path.name)
    result = _run(promtool, "test", "rules", *(p.name for p in RULE_TESTS), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_for_overrides_windows(tmp_path: Path) -> None:
    text = monitoring.render_rules({"*": "15s", "SmgRelayDown": "5s"})
    windows = re.findall(r"^\s+for: (\S+)$", text, re.M)
    assert len(windows) == len(monitoring.alert_names())
    assert windows.count("5s") == 1 and windows.count("15s") == len(windows) - 1
    path = tmp_path / "rules.yml"
    path.write_text(text)
    result = _run(_tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool(fleet: Fleet, tmp_path: Path) -> None:
    monitor = fleet.get("otc-de-mta01")
    text = monitoring.prometheus_yml(fleet, monitor)
    for gateway in fleet:
        assert f"gateway: {gateway.name}, role: {gateway.role}" in text
    assert text.count(':9525"]') == len(fleet.gateways) and ':9100"]' in text
    rules = tmp_path / "smg-rules.yml"
    rules.write_text(monitoring.rules(monitor))
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace(monitoring.RULES, str(rules)))
    result = _run(_tool("promtool"), "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 18 rules found" in result.stdout


def test_alertmanager_config_passes_amtool(fleet: Fleet, tmp_path: Path) -> None:
    text = monitoring.alertmanager_yml(fleet.get("otc-de-mta01"))
    assert 'to: "DD-OTC-SDM@telekom.de"' in text
    assert 'smtp_smarthost: "127.0.0.1:25"' in text
    path = tmp_path / "alertmanager.yml"
    path.write_text(text)
    result = _run(_tool("amtool"), "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_monitoring_host_scrapes(fleet: Fleet, tmp_path: Path) -> None:
    monitor = fleet.get("otc-de-mta01")
    for gateway in fleet:
        text = firewall.nftables_conf(fleet, gateway)
        line = next(x for x in text.splitlines() if "metrics to the monitoring host" in x)
        assert f"saddr {{ {monitor.listen_address}/128 }} tcp dport {{ 9525, 9100 }}" in line
        web = [x for x in text.splitlines() if "dport { 9090, 9093 }" in x]
        assert len(web) == (1 if gateway is monitor else 0)
        assert "2001:db8:ff::/64" in "".join(web) or gateway is not monitor
        config = relay_config(list(fleet.gateways), gateway)["gateway"]
        assert config["metrics_listen"] == f"[{gateway.listen_address}]:9525"
        assert config["metrics_public"] is True
    checked = nft_check(firewall.nftables_conf(fleet, monitor), tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert monitoring.packages(monitor) == [*monitoring.NODE_PACKAGES, *monitoring.SERVER_PACKAGES]
    assert monitoring.packages(fleet.get("otc-de-mta03")) == monitoring.NODE_PACKAGES
    unit = blacklist.units(monitor)[blacklist.SERVICE]
    assert "--textfile /var/lib/prometheus/node-exporter/blacklist.prom" in unit
    assert "ReadWritePaths=/var/lib/prometheus/node-exporter" in unit


def test_without_monitoring_host_metrics_stay_on_loopback(tmp_path: Path) -> None:
    fleet = Site(tmp_path, TestCA(tmp_path / "ca")).load()
    gateway = fleet.get("otc-de-mta01")
    assert relay_config(list(fleet.gateways), gateway)["gateway"]["metrics_listen"] == (
        "127.0.0.1:9525"
    )
    assert monitoring.packages(gateway) == []
    assert "metrics to the monitoring host" not in firewall.nftables_conf(fleet, gateway)
    assert "--textfile" not in blacklist.units(gateway)[blacklist.SERVICE]


def test_bad_monitoring_keys_are_refused(tmp_path: Path) -> None:
    site = Site(tmp_path, TestCA(tmp_path / "ca"))
    site.all.update(
        monitoring_host="otc-de-mta09",
        alert_for={"SmgNoSuchAlert": "1m", "*": "10s"},
        scrape_interval="often",
    )
    problems = site.problems()
    one(problems, r"monitoring_host.*'otc-de-mta09' is not a host of this inventory")
    one(problems, r"alert_for.*'SmgNoSuchAlert' is not an alert")
    one(problems, r"scrape_interval.*expected a Prometheus duration")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every query of the Grafana dashboard parses (as recording rules, by promtool); the lab
    test (tests/acceptance/test_monitoring.py) checks that they return series."""
    import json

    dashboard = json.loads((REPO / "dashboards" / "smg-fleet.json").read_text())
    exprs = [
        t["expr"].replace("$gateway", ".*").replace("$tenant", ".*")
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]
    assert len(exprs) >= 25
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"gateway", "tenant"}
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{n}", "expr": e} for n, e in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = _run(_tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
