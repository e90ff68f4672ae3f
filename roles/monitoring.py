"""monitoring: node exporter on every gateway; Prometheus and Alertmanager (Debian's packages)
on the inventory's ``monitoring_host``, rendered from templates/monitoring/.

Prometheus scrapes every gateway's relay metrics (``relay_metrics_port``, on the fleet address
when monitoring is on) and node exporter (9100) over the fleet network; the firewall opens
both ports to the monitoring host only (roles/firewall.py), and Prometheus' and
Alertmanager's web ports to ``ssh_networks`` only.  The alert rules are the kit's
(templates/monitoring/smg-rules.yml.j2) with the inventory's ``alert_for`` windows;
Alertmanager mails ``operations_mailbox`` through the monitoring host's own relay on loopback.
Without ``monitoring_host`` nothing of this is deployed and the relay's metrics stay on
loopback.  docs/monitoring.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from pyinfra.api import deploy
from pyinfra.operations import systemd

from deploykit.fleet import Fleet
from deploykit.host import Gateway
from deploykit.paths import SMTP_PORT
from roles import ops
from roles.render import TEMPLATES_DIR, render

NODE_PORT = 9100
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
NODE_PACKAGES = ["prometheus-node-exporter"]
SERVER_PACKAGES = ["prometheus", "prometheus-alertmanager"]
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"  # Debian's; the blacklist monitor writes here
PROMETHEUS_DIR = "/etc/prometheus"
RULES = f"{PROMETHEUS_DIR}/smg-rules.yml"
PROMETHEUS_CONF = f"{PROMETHEUS_DIR}/prometheus.yml"
ALERTMANAGER_CONF = f"{PROMETHEUS_DIR}/alertmanager.yml"
DEFAULTS = {
    "prometheus-node-exporter": "/etc/default/prometheus-node-exporter",
    "prometheus": "/etc/default/prometheus",
    "prometheus-alertmanager": "/etc/default/prometheus-alertmanager",
}
RULES_TEMPLATE = "monitoring/smg-rules.yml.j2"


def enabled(gateway: Gateway) -> bool:
    return gateway["monitoring_host"] is not None


def is_monitoring_host(gateway: Gateway) -> bool:
    return gateway["monitoring_host"] == gateway.name


def packages(gateway: Gateway) -> list[str]:
    if not enabled(gateway):
        return []
    return NODE_PACKAGES + (SERVER_PACKAGES if is_monitoring_host(gateway) else [])


def monitoring_gateway(fleet: Fleet, gateway: Gateway) -> Gateway | None:
    name = gateway["monitoring_host"]
    return fleet.get(name) if name is not None else None


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@cache
def alert_names() -> tuple[str, ...]:
    """Every alert the kit ships (deploykit.checks checks alert_for against them)."""
    text = (TEMPLATES_DIR / RULES_TEMPLATE).read_text()
    return tuple(re.findall(r"^\s*- alert: (\w+)", text, re.M))


@dataclass(frozen=True)
class Target:
    name: str
    role: str
    relay: str
    node: str


def targets(fleet: Fleet) -> list[Target]:
    return [
        Target(
            g.name,
            g.role,
            _address(g.listen_address, g["relay_metrics_port"]),
            _address(g.listen_address, NODE_PORT),
        )
        for g in fleet
    ]


def render_rules(alert_for: dict[str, str]) -> str:
    return render(RULES_TEMPLATE, alert_for=alert_for)


def rules(gateway: Gateway) -> str:
    return render_rules(dict(gateway["alert_for"]))


def prometheus_yml(fleet: Fleet, gateway: Gateway) -> str:
    return render(
        "monitoring/prometheus.yml.j2",
        host_name=gateway.name,
        scrape_interval=gateway["scrape_interval"],
        rules_path=RULES,
        targets=targets(fleet),
        prometheus_address=_address(gateway.listen_address, PROMETHEUS_PORT),
        alertmanager_address=_address(gateway.listen_address, ALERTMANAGER_PORT),
    )


def alertmanager_yml(gateway: Gateway) -> str:
    # Alerts of a short-window lab group quickly too: group_wait follows the scrape interval.
    short = gateway["scrape_interval"] if gateway["alert_for"] else "30s"
    return render(
        "monitoring/alertmanager.yml.j2",
        host_name=gateway.name,
        fqdn=gateway.fqdn,
        smarthost=f"127.0.0.1:{SMTP_PORT}",
        mail_from=f"alertmanager@{gateway.fqdn}",
        mailbox=gateway["operations_mailbox"],
        group_wait=short,
        group_interval="1m" if gateway["alert_for"] else "5m",
    )


def node_files(gateway: Gateway) -> list[ops.Wanted]:
    listen = _address(gateway.listen_address, NODE_PORT)
    text = render("monitoring/node-exporter.default.j2", listen=listen, textfile_dir=TEXTFILE_DIR)
    return [
        ops.File(DEFAULTS["prometheus-node-exporter"], text),
        # The blacklist monitor (user smg) writes blacklist.prom; node exporter only reads.
        ops.Directory(TEXTFILE_DIR, "root", "smg", "775"),
    ]


Files = dict[str, list[ops.Wanted]]


def server_files(fleet: Fleet, gateway: Gateway) -> tuple[Files, Files]:
    """Per service: its config files (a change: reload) and its /etc/default file (restart)."""
    prometheus_args = render(
        "monitoring/prometheus.default.j2",
        listen=_address(gateway.listen_address, PROMETHEUS_PORT),
        retention=gateway["monitoring_retention"],
    )
    alertmanager_args = render(
        "monitoring/alertmanager.default.j2",
        listen=_address(gateway.listen_address, ALERTMANAGER_PORT),
    )
    return {
        "prometheus": [
            ops.File(PROMETHEUS_CONF, prometheus_yml(fleet, gateway)),
            ops.File(RULES, rules(gateway)),
        ],
        "prometheus-alertmanager": [ops.File(ALERTMANAGER_CONF, alertmanager_yml(gateway))],
    }, {
        "prometheus": [ops.File(DEFAULTS["prometheus"], prometheus_args)],
        "prometheus-alertmanager": [
            ops.File(DEFAULTS["prometheus-alertmanager"], alertmanager_args)
        ],
    }


def _service(name: str, config: list[ops.Wanted], args: list[ops.Wanted]) -> None:
    conf = ops.ensure(name=f"monitoring: {name} config", items=config) if config else None
    defaults = ops.ensure(name=f"monitoring: {name} arguments", items=args)
    systemd.service(name=f"monitoring: {name} running", service=name, running=True, enabled=True)
    systemd.service(
        name=f"monitoring: restart {name} for new arguments",
        service=name,
        running=None,
        restarted=True,
        _if=defaults.did_change,
    )
    if conf is not None:
        systemd.service(
            name=f"monitoring: reload {name} for the changed config",
            service=name,
            running=None,
            reloaded=True,
            _if=lambda: conf.did_change() and not defaults.did_change(),
        )


@deploy("monitoring: node exporter, Prometheus, Alertmanager")
def apply(fleet: Fleet, gateway: Gateway) -> None:
    if not enabled(gateway):
        return
    files = node_files(gateway)
    _service("prometheus-node-exporter", [], files)
    if is_monitoring_host(gateway):
        config, args = server_files(fleet, gateway)
        for service in ("prometheus", "prometheus-alertmanager"):
            _service(service, config[service], args[service])
