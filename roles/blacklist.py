"""blacklist: the daily blacklist check (``smg blacklist check``) as a systemd service + timer,
rendered from templates/blacklist/ (the blacklist feature's), enabled on the hosts named in
``blacklist_monitor_hosts`` and absent elsewhere (one monitor is enough: it checks every
address of the fleet, and two would notify twice)."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from gateway.inventory import Gateway, HostPaths
from roles.render import render, text_io

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
    }
    return {
        SERVICE: render(f"blacklist/{SERVICE}.j2", **values),
        TIMER: render(f"blacklist/{TIMER}.j2", **values),
    }


@deploy("blacklist: the daily check")
def apply(gateway: Gateway) -> None:
    if gateway.runs_blacklist_monitor:
        puts = [
            files.put(
                name=f"blacklist: {name}", src=text_io(text), dest=f"{UNIT_DIR}/{name}", mode="644"
            )
            for name, text in units(gateway).items()
        ]
        systemd.daemon_reload(
            name="systemd: daemon-reload for the blacklist units", _if=any_changed(*puts)
        )
        systemd.service(name="blacklist: timer enabled", service=TIMER, running=True, enabled=True)
        systemd.service(
            name="blacklist: restart the changed timer",
            service=TIMER,
            restarted=True,
            _if=any_changed(*puts),
        )
        return
    systemd.service(name="blacklist: no timer here", service=TIMER, running=False, enabled=False)
    removed = [
        files.file(name=f"blacklist: no {name}", path=f"{UNIT_DIR}/{name}", present=False)
        for name in (SERVICE, TIMER)
    ]
    systemd.daemon_reload(
        name="systemd: daemon-reload after removing the blacklist units", _if=any_changed(*removed)
    )
