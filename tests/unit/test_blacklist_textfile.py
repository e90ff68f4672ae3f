"""The blacklist state as a node-exporter textfile (issue 15): a listing is a series at 1,
label values escaped, the file replaced atomically and parsed by promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.blacklist import textfile
from gateway.blacklist.answers import CLEAN, LISTED, UNKNOWN
from gateway.blacklist.lookup import Result


def _results() -> list[Result]:
    return [
        Result("198.51.100.10", "dnsbl.lab.example", "lab DNSBL", True, LISTED),
        Result("198.51.100.11", "dnsbl.lab.example", "lab DNSBL", True, CLEAN),
        Result("198.51.100.11", "bl.example", 'a "quoted"\nname', False, UNKNOWN),
    ]


def test_render_and_write(tmp_path: Path) -> None:
    text = textfile.render(_results(), 2, now=1700000000)
    assert (
        'smg_blacklist_listed{address="198.51.100.10",zone="dnsbl.lab.example",'
        'list="lab DNSBL",major="1"} 1' in text
    )
    assert 'smg_blacklist_listed{address="198.51.100.11",zone="dnsbl.lab.example"' in text
    assert 'list="a \\"quoted\\"\\nname",major="0"} 1' in text  # the unknown series
    assert "smg_blacklist_check_exit_code 2" in text
    target = tmp_path / "blacklist.prom"
    textfile.write(target, text)
    textfile.write(target, text)  # replaced, no leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["blacklist.prom"]
    assert target.stat().st_mode & 0o777 == 0o644
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (scripts/setup.sh)")
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert "error" not in check.stdout + check.stderr.lower(), check.stderr


def test_failed_check_writes_exit_code_3(tmp_path: Path) -> None:
    text = textfile.render([], 3, now=1)
    assert "smg_blacklist_check_exit_code 3" in text
    assert "smg_blacklist_listed{" not in text
