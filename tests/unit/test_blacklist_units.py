"""The systemd service and timer of the daily check, and the CLI's own errors (exit 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.blacklist.units import UNIT_NAMES, render_units
from gateway.cli import main
from gateway.config import BlacklistSection, parse_config
from tests.conftest import require_binaries

SMG = Path(sys.executable).parent / "smg"


def section(**keys: object) -> BlacklistSection:
    return parse_config(
        {"gateway": {"hostname": "gw1.example.net"}, "spam": {"enabled": False}, "blacklist": keys}
    ).blacklist


def test_timer_runs_daily_at_five_berlin_time_and_catches_up() -> None:
    units = render_units(section(), config_path="/etc/smg/smg.toml", smg_command="/opt/smg/bin/smg")
    timer = units["smg-blacklist.timer"]
    assert "OnCalendar=*-*-* 05:00:00 Europe/Berlin\n" in timer
    assert "Persistent=true\n" in timer
    assert "Unit=smg-blacklist.service\n" in timer
    assert "WantedBy=timers.target" in timer


def test_service_runs_the_check_as_the_user_with_its_state_directory() -> None:
    units = render_units(
        section(),
        config_path="/etc/smg/smg.toml",
        smg_command="/opt/smg/bin/smg",
        user="smg-blacklist",
    )
    service = units["smg-blacklist.service"]
    assert "ExecStart=/opt/smg/bin/smg blacklist check --config /etc/smg/smg.toml\n" in service
    assert "User=smg-blacklist\nGroup=smg-blacklist\n" in service
    assert "Type=oneshot\n" in service
    assert "SuccessExitStatus=1 2\n" in service
    assert "StateDirectory=smg\n" in service
    assert "{{" not in service and "{%" not in service


def test_schedule_timezone_and_state_elsewhere_are_configurable() -> None:
    units = render_units(
        section(schedule="Mon..Fri *-*-* 06:30:00", timezone="UTC", state="/srv/smg/bl.sqlite"),
        config_path="/etc/smg/smg.toml",
        smg_command="/opt/smg/bin/smg",
    )
    assert "OnCalendar=Mon..Fri *-*-* 06:30:00 UTC\n" in units["smg-blacklist.timer"]
    service = units["smg-blacklist.service"]
    assert "ReadWritePaths=/srv/smg\n" in service and "StateDirectory" not in service


def test_relative_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="absolute"):
        render_units(section(), config_path="smg.toml", smg_command="/opt/smg/bin/smg")


def test_systemd_accepts_the_rendered_units(tmp_path: Path) -> None:
    require_binaries("systemd-analyze")  # skips locally, fails in CI
    units = render_units(section(), config_path="/etc/smg/smg.toml", smg_command=str(SMG))
    for name in UNIT_NAMES:
        (tmp_path / name).write_text(units[name])
    calendar = subprocess.run(
        ["systemd-analyze", "calendar", "*-*-* 05:00:00 Europe/Berlin"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert calendar.returncode == 0 and "Next elapse" in calendar.stdout
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNIT_NAMES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr


# --- the CLI never exits 1/2 for its own errors --------------------------------------------------


def test_usage_errors_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["blacklist", "check"], ["blacklist", "check", "--config", "x", "--bogus"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 3
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_bad_config_exits_3_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "smg.toml"
    path.write_text(
        '[gateway]\nhostname = "gw1.example.net"\n[spam]\nenabled = false\n'
        '[blacklist]\ntimezone = "Mars/Olympus"\n'
    )
    assert main(["blacklist", "check", "--config", str(path)]) == 3
    out = capsys.readouterr().out
    assert out.startswith("BLACKLIST UNKNOWN - ")
    assert f"{path}: blacklist.timezone: not a time zone" in out


def test_nothing_to_check_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smg.toml"
    path.write_text('[gateway]\nhostname = "gw1.example.net"\n[spam]\nenabled = false\n')
    assert main(["blacklist", "check", "--config", str(path)]) == 3
    assert "blacklist.addresses is empty" in capsys.readouterr().out


def test_status_before_any_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smg.toml"
    path.write_text(
        '[gateway]\nhostname = "gw1.example.net"\n[spam]\nenabled = false\n'
        f'[blacklist]\nstate = "{tmp_path}/bl.sqlite"\n'
    )
    assert main(["blacklist", "status", "--config", str(path)]) == 0
    assert "no check has run yet" in capsys.readouterr().out
    assert not (tmp_path / "bl.sqlite").exists()
