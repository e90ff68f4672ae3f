"""Render the systemd units of the daily check from ``templates/blacklist/*.j2``.

The deploy's blacklist role calls :func:`render_units` (or renders the templates itself with
:func:`unit_variables`) for the hosts chosen in the inventory.  Jinja2 is a deploy dependency,
imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.config import BlacklistSection

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "templates" / "blacklist"
UNIT_NAMES = ("smg-blacklist.service", "smg-blacklist.timer")
_VAR_LIB = Path("/var/lib")


def unit_variables(
    section: BlacklistSection,
    *,
    config_path: str | Path,
    smg_command: str | Path = "/usr/local/bin/smg",
    user: str = "smg",
    group: str | None = None,
    randomized_delay: str = "0",
    timeout: str = "15min",
) -> dict[str, Any]:
    """Every variable the templates use.

    ``schedule`` + ``timezone`` make ``OnCalendar`` (``*-*-* 05:00:00 Europe/Berlin``);
    ``state_directory`` is set when the state lives under /var/lib (systemd then creates it for
    ``user``), else ``state_dir`` is made writable in the sandbox.
    """
    if not Path(smg_command).is_absolute() or not Path(config_path).is_absolute():
        raise ValueError("smg_command and config_path must be absolute paths")
    state_dir = Path(section.state).parent
    state_directory = (
        str(state_dir.relative_to(_VAR_LIB)) if state_dir.is_relative_to(_VAR_LIB) else ""
    )
    return {
        "managed_note": "Rendered by the deploy from templates/blacklist; edits here are lost.",
        "on_calendar": f"{section.schedule} {section.timezone}",
        "schedule": section.schedule,
        "timezone": section.timezone,
        "config_path": str(config_path),
        "smg_command": str(smg_command),
        "user": user,
        "group": group or user,
        "state_dir": str(state_dir),
        "state_directory": state_directory if state_directory != "." else "",
        "randomized_delay": randomized_delay,
        "timeout": timeout,
    }


def render_units(
    section: BlacklistSection, *, template_dir: Path = TEMPLATE_DIR, **variables: Any
) -> dict[str, str]:
    """``{"smg-blacklist.service": text, "smg-blacklist.timer": text}``."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # systemd units, not HTML
    )
    values = unit_variables(section, **variables)
    return {name: env.get_template(f"{name}.j2").render(**values) for name in UNIT_NAMES}
