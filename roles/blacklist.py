"""blacklist: the daily blacklist check (``smg blacklist check``) as a systemd service + timer,
rendered from templates/blacklist/ (the blacklist feature's), enabled on the hosts named in
``blacklist_monitor_hosts`` and absent elsewhere.  One monitor checks every address of the
fleet; a second (and third) is a fallback: it notifies only when the hosts ranked before it are
down (leader with fallback, gateway/blacklist/fallback.py)."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import systemd

from deploykit.fleet import Fleet
from deploykit.host import Gateway
from deploykit.paths import HostPaths
from roles import ops
from roles.monitoring import TEXTFILE_DIR
from roles.render import render

SERVICE = "smg-blacklist.service"
TIMER = "smg-blacklist.timer"
UNIT_DIR = "/etc/systemd/system"


def fallback_args(gateway: Gateway, fleet: Fleet | None) -> tuple[str, int]:
    """A monitor ranked after others in ``blacklist_monitor_hosts`` (leader with fallback,
    docs/blacklist.md): ``--defer-to`` each host before it, after ``--defer-wait``; and the
    seconds of that wait (the unit's start timeout grows by it)."""
    ranking = list(gateway["blacklist_monitor_hosts"])
    if fleet is None or gateway.name not in ranking or ranking.index(gateway.name) == 0:
        return "", 0
    before = [fleet.get(name) for name in ranking[: ranking.index(gateway.name)]]
    delay = int(gateway["blacklist_fallback_delay"]) * ranking.index(gateway.name)
    targets = " ".join(f"--defer-to {_host_port(g.listen_address)}" for g in before)
    return f" {targets} --defer-wait {delay}", delay


def _host_port(address: str) -> str:
    return f"[{address}]:25" if ":" in address else f"{address}:25"


def units(gateway: Gateway, fleet: Fleet | None = None) -> dict[str, str]:
    args, delay = fallback_args(gateway, fleet)
    values = {
        "fallback_args": args,
        "user": HostPaths.USER,
        "group": HostPaths.USER,
        "smg_command": HostPaths.SMG,
        "config_path": HostPaths.CONFIG,
        "timeout": f"{15 * 60 + delay}s",
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


def unit_files(gateway: Gateway, fleet: Fleet | None = None) -> list[ops.Wanted]:
    if gateway.runs_blacklist_monitor:
        return [
            ops.File(f"{UNIT_DIR}/{name}", text) for name, text in units(gateway, fleet).items()
        ]
    return [ops.Absent(f"{UNIT_DIR}/{name}") for name in (SERVICE, TIMER)]


@deploy("blacklist: the daily check")
def apply(gateway: Gateway, fleet: Fleet | None = None) -> None:
    here = gateway.runs_blacklist_monitor
    if not here:
        systemd.service(
            name="blacklist: no timer here", service=TIMER, running=False, enabled=False
        )
    units_op = ops.ensure(
        name="blacklist: units" if here else "blacklist: no units here",
        items=unit_files(gateway, fleet),
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
