"""The relay wheel holds the relay only: ``gateway/`` and its dist-info.  The deploy's own Python
(deploykit/, roles/), the lab, the benches, devkit/ and the tests stay on the control machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

KIT = Path(__file__).resolve().parents[2]
CONTROL_MACHINE_ONLY = ("deploykit", "roles", "devkit", "lab", "bench", "inventories", "tests")


def kit_copy(target: Path) -> Path:
    """The kit's tracked files: pip builds in the source tree, which must not be the worktree."""
    listed = subprocess.run(
        ["git", "-C", str(KIT), "ls-files", "-z"], capture_output=True, check=True, timeout=60
    )
    for name in listed.stdout.decode().split("\0"):
        source = KIT / name
        if name and source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_relay_wheel_holds_only_the_gateway_package(tmp_path: Path) -> None:
    source = kit_copy(tmp_path / "kit")
    assert all((source / name).is_dir() for name in ("deploykit", "roles", "devkit", "lab"))
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*pip_wheel, "--quiet", "--wheel-dir", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("secure_mail_gateway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top - dist_info == {"gateway"}, sorted(top)
    assert "gateway/__init__.py" in names
    assert not [n for n in names if n.split("/", 1)[0] in CONTROL_MACHINE_ONLY]
