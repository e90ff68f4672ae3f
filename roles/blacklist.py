"""blacklist: the daily blacklist check (``smg blacklist check``) as a systemd service + timer,
rendered from templates/blacklist/ (the blacklist feature's), enabled on the hosts named in
``blacklist_monitor_hosts`` and absent elsewhere (one monitor is enough: it checks every
address of the fleet, and two would notify twice)."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import systemd

from deploykit.host import Gateway
from deploykit.paths import HostPaths
from roles import ops
from roles.monitoring import TEXTFILE_DIR
from roles.render import render

SERVICE = "smg-blacklist.service"
TIMER = "smg-blacklist.timer"
UNIT_DIR = "/etc/systemd/system"


def units(gateway: Gateway) -> dict[str, str]:
    values = {
        "user": HostPaths.USER,
        "group": HostPaths.USER,
        "smg_command": HostPaths.SMG,
        "config_path": HostPaths.CONFIG,
        "timeout": "15min",
        "state_directory": "smg",
        "state_dir": HostPaths.STATE_DIR,
        "timezone": gateway["blacklist_timezone"],
        "on_calendar": f"{gateway['blacklist_schedule']} {gateway['blacklist_timezone']}",
        # The service description says 5am: no random delay.
        "randomized_delay": "0",
        # With monitoring: blacklist.prom for node exporter's textfile collector.
        "textfile": f"{TEXTFILE_DIR}/blacklist.prom" if gateway["monitoring_host"] else None,
        "textfile_dir": TEXTFILE_DIR,
    }
    return {
        SERVICE: render(f"blacklist/{SERVICE}.j2", **values),
        TIMER: render(f"blacklist/{TIMER}.j2", **values),
    }


def unit_files(gateway: Gateway) -> list[ops.Wanted]:
    if gateway.runs_blacklist_monitor:
        return [ops.File(f"{UNIT_DIR}/{name}", text) for name, text in units(gateway).items()]
    return [ops.Absent(f"{UNIT_DIR}/{name}") for name in (SERVICE, TIMER)]


@deploy("blacklist: the daily check")
def apply(gateway: Gateway) -> None:
    here = gateway.runs_blacklist_monitor
    if not here:
        systemd.service(
            name="blacklist: no timer here", service=TIMER, running=False, enabled=False
        )
    units_op = ops.ensure(
        name="blacklist: units" if here else "blacklist: no units here", items=unit_files(gateway)
    )
    systemd.daemon_reload(
        name="systemd: daemon-reload for the blacklist units", _if=units_op.did_change
    )
    if here:
        systemd.service(name="blacklist: timer enabled", service=TIMER, running=True, enabled=True)
        systemd.service(
            name="blacklist: restart the changed timer",
            service=TIMER,
            running=None,
            restarted=True,
            _if=units_op.did_change,
        )
