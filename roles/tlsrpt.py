"""tlsrpt: the daily TLS reports (RFC 8460, ``smg tls report --send``) as a systemd service +
timer on the good gateways (the ones that deliver mail directly), absent on the bad one."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import systemd

from deploykit.host import Gateway
from deploykit.paths import HostPaths
from roles import ops
from roles.render import render

SERVICE = "smg-tlsrpt.service"
TIMER = "smg-tlsrpt.timer"
UNIT_DIR = "/etc/systemd/system"
ON_CALENDAR = "*-*-* 00:30:00 UTC"


def units() -> dict[str, str]:
    values = {
        "user": HostPaths.USER,
        "group": HostPaths.USER,
        "smg_command": HostPaths.SMG,
        "config_path": HostPaths.CONFIG,
        "spool_dir": HostPaths.SPOOL,
        "on_calendar": ON_CALENDAR,
    }
    return {name: render(f"tlsrpt/{name}.j2", **values) for name in (SERVICE, TIMER)}


def unit_files(gateway: Gateway) -> list[ops.Wanted]:
    if gateway.role == "good":
        return [ops.File(f"{UNIT_DIR}/{name}", text) for name, text in units().items()]
    return [ops.Absent(f"{UNIT_DIR}/{name}") for name in (SERVICE, TIMER)]


@deploy("tlsrpt: daily TLS reports")
def apply(gateway: Gateway) -> None:
    units_op = ops.ensure(name="tlsrpt: service and timer units", items=unit_files(gateway))
    systemd.daemon_reload(
        name="systemd: daemon-reload for the tlsrpt units", _if=units_op.did_change
    )
    if gateway.role == "good":
        systemd.service(name="tlsrpt: timer enabled", service=TIMER, running=True, enabled=True)
