"""relay: our package in /opt/smg/venv from a wheelhouse built on the control machine (hosts
need no Python package index: Debian's python3 + python3-venv and the uploaded wheels), the
config /etc/smg/smg.toml rendered from the inventory, and the hardened unit ``smg.service``.

A config change (the config, the certificate, a DKIM key) is a reload (SIGHUP): sessions and
the queue stay.  New code or a changed unit is a restart.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import Sha1File
from pyinfra.operations import files, pip, server, systemd
from pyinfra.operations.util import any_changed

from gateway.inventory import Fleet, Gateway, HostPaths
from roles.render import KIT_DIR, render, text_io

UNIT = "/etc/systemd/system/smg.service"
SUMS = "SHA256SUMS"
INSTALLED_SUMS = f"{HostPaths.VENV}/installed-{SUMS}"
WHEELHOUSE = KIT_DIR / "wheelhouse"
PACKAGE = "secure_mail_gateway"
# Fixed timestamps make the wheel byte-identical for identical sources, so a re-run uploads
# nothing.
SOURCE_DATE_EPOCH = "315532800"


# --- the wheelhouse (control machine) -------------------------------------------------------


def source_files(kit: Path = KIT_DIR) -> list[Path]:
    sources = [kit / "pyproject.toml"]
    sources += sorted(p for p in (kit / "gateway").rglob("*") if p.is_file() and _is_source(p))
    return sources


def _is_source(path: Path) -> bool:
    return "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")


def source_digest(kit: Path = KIT_DIR) -> str:
    digest = hashlib.sha256()
    for path in source_files(kit):
        digest.update(str(path.relative_to(kit)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@cache
def build_wheelhouse(kit: Path = KIT_DIR, wheelhouse: Path = WHEELHOUSE) -> Path:
    """wheelhouse/ with our wheel and every dependency, rebuilt only when the sources changed.
    Built from a snapshot of the sources so that the digest names exactly what was built."""
    digest = source_digest(kit)
    stamp = wheelhouse / ".source-digest"
    if stamp.is_file() and stamp.read_text().strip() == digest and (wheelhouse / SUMS).is_file():
        return wheelhouse
    with tempfile.TemporaryDirectory(prefix="smg-wheels-") as tmp:
        snapshot, fresh = Path(tmp) / "src", Path(tmp) / "wheels"
        for path in source_files(kit):
            target = snapshot / path.relative_to(kit)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        env = {
            **os.environ,
            "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(fresh)]
        built = subprocess.run(
            [*command, str(snapshot)], env=env, timeout=600, capture_output=True, text=True
        )
        if built.returncode != 0:
            raise RuntimeError(f"pip wheel failed building the wheelhouse:\n{built.stderr}")
        (fresh / SUMS).write_text(_sums(fresh))
        (fresh / ".source-digest").write_text(digest + "\n")
        if wheelhouse.exists():
            shutil.rmtree(wheelhouse)
        shutil.copytree(fresh, wheelhouse)
    return wheelhouse


def _sums(folder: Path) -> str:
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
        for p in sorted(folder.glob("*.whl"))
    ]
    return "\n".join(lines) + "\n"


def sums_sha1(wheelhouse: Path) -> str:
    return hashlib.sha1((wheelhouse / SUMS).read_bytes()).hexdigest()


# --- what the host gets ---------------------------------------------------------------------


def unit_file(gateway: Gateway) -> str:
    after = ["network-online.target"]
    if gateway.role == "good":
        after += ["clamav-daemon.service", "rspamd.service"]
    return render(
        "relay/smg.service.j2",
        role=gateway.role,
        user=HostPaths.USER,
        smg=HostPaths.SMG,
        config=HostPaths.CONFIG,
        spool=HostPaths.SPOOL,
        after=" ".join(after),
        docs="/opt/smg/README",
    )


def install_commands(wheelhouse: str = HostPaths.WHEELHOUSE) -> list[str]:
    pip_install = f"{HostPaths.VENV}/bin/pip install --quiet --no-index --find-links {wheelhouse}"
    return [
        # Dependencies as needed, then our own wheel always: its version does not change with
        # every build, its content does.
        f"{pip_install} {wheelhouse}/{PACKAGE}-*.whl",
        f"{pip_install} --no-deps --force-reinstall {wheelhouse}/{PACKAGE}-*.whl",
        f"cp {wheelhouse}/{SUMS} {INSTALLED_SUMS}",
    ]


@deploy("relay: package, config, unit")
def apply(fleet: Fleet, gateway: Gateway, reload_on: list[OperationMeta]) -> None:
    wheelhouse = build_wheelhouse()
    installed = host.get_fact(Sha1File, path=INSTALLED_SUMS)
    files.directory(
        name=f"directory {HostPaths.OPT}", path=HostPaths.OPT, user="root", group="root", mode="755"
    )
    files.sync(
        name="relay: the wheelhouse",
        src=str(wheelhouse),
        dest=HostPaths.WHEELHOUSE,
        user="root",
        group="root",
        mode="644",
        dir_mode="755",
        delete=True,
        exclude=".source-digest",
    )
    pip.venv(name=f"relay: {HostPaths.VENV}", path=HostPaths.VENV, python="python3")
    install = server.shell(
        name="relay: install the wheels into the venv",
        commands=install_commands(),
        _if=lambda: installed != sums_sha1(wheelhouse),
    )

    config = files.put(
        name=f"relay: {HostPaths.CONFIG}",
        src=text_io(fleet.relay_toml(gateway.name)),
        dest=HostPaths.CONFIG,
        user="root",
        group=HostPaths.USER,
        mode="640",
    )
    unit = files.put(
        name="relay: smg.service", src=text_io(unit_file(gateway)), dest=UNIT, mode="644"
    )
    systemd.daemon_reload(name="systemd: daemon-reload for smg.service", _if=unit.did_change)

    restart_for = any_changed(install, unit)
    reload_for = any_changed(config, *reload_on)
    systemd.service(
        name="relay: enabled and running", service="smg.service", running=True, enabled=True
    )
    systemd.service(
        name="relay: restart for new code or unit",
        service="smg.service",
        restarted=True,
        _if=restart_for,
    )
    systemd.service(
        name="relay: reload for the changed config (SIGHUP)",
        service="smg.service",
        reloaded=True,
        _if=_only(reload_for, unless=restart_for),
    )


def _only(condition: Callable[[], bool], unless: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: condition() and not unless()
