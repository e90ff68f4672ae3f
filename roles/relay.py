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
import tomllib
from collections.abc import Callable
from functools import cache
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import FileContents, FindFiles
from pyinfra.operations import systemd
from pyinfra.operations.util import any_changed

from deploykit.fleet import Fleet
from deploykit.host import Gateway
from deploykit.paths import HostPaths
from gateway.config import ConfigError, parse_config, restart_only_changes
from gateway.config.values import parse_size
from roles import ops
from roles.render import KIT_DIR, render

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
    Built from a snapshot of the sources so that the digest names exactly what was built.

    ``SMG_WHEELHOUSE=DIR`` deploys a wheelhouse built before (a release, a CI artifact) as it
    is, whatever the working tree holds now."""
    given = os.environ.get("SMG_WHEELHOUSE")
    if given:
        if not (Path(given) / SUMS).is_file():
            raise RuntimeError(f"SMG_WHEELHOUSE={given}: no {SUMS} there: not a wheelhouse")
        return Path(given)
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
        **unit_limits(gateway["relay_settings"].get("gateway", {})),
    )


MIB = 1 << 20
BASE_MEMORY = 128 * MIB  # one relay process without mail in flight (about 45 MiB measured)
PEAK_COPIES = 4  # the message bytes at their peak per budgeted byte (docs/performance.md)
TASKS_PER_WORKER = 32  # the event loop, the spool writer, the resolver's and asyncio's threads


def unit_limits(settings: dict[str, object]) -> dict[str, str | int]:
    """``MemoryMax=`` and ``TasksMax=`` for the configured budget and workers
    (``gateway.data_memory``, ``gateway.workers``, defaults as the relay's)."""
    budget = parse_size(str(settings.get("data_memory", "256MiB")))
    workers = int(str(settings.get("workers", 1)))
    memory = workers * (BASE_MEMORY + PEAK_COPIES * budget)
    return {
        "workers": workers,
        "memory_max": f"{-(-memory // MIB)}M",
        "tasks_max": 16 + workers * TASKS_PER_WORKER,
    }


def install_commands(wheelhouse: str = HostPaths.WHEELHOUSE) -> list[str]:
    pip_install = f"{HostPaths.VENV}/bin/pip install --quiet --no-index --find-links {wheelhouse}"
    return [
        # Dependencies as needed, then our own wheel always: its version does not change with
        # every build, its content does.
        f"{pip_install} {wheelhouse}/{PACKAGE}-*.whl",
        f"{pip_install} --no-deps --force-reinstall {wheelhouse}/{PACKAGE}-*.whl",
        f"cp {wheelhouse}/{SUMS} {INSTALLED_SUMS}",
    ]


def package_files(wheelhouse: Path, present: list[str]) -> list[ops.Wanted]:
    """The wheelhouse on the host, exactly (stale wheels go); its SHA256SUMS last, so that
    an upload cut short leaves the old list and is redone."""
    wheels = {f"{HostPaths.WHEELHOUSE}/{p.name}": p for p in sorted(wheelhouse.glob("*.whl"))}
    sums = f"{HostPaths.WHEELHOUSE}/{SUMS}"
    items: list[ops.Wanted] = [ops.Directory(HostPaths.OPT), ops.Directory(HostPaths.WHEELHOUSE)]
    items += [ops.File(dest, src=src) for dest, src in wheels.items()]
    items += [ops.Absent(p) for p in sorted(set(present) - set(wheels) - {sums})]
    items.append(ops.File(sums, src=wheelhouse / SUMS))
    return items


@operation()
def wheelhouse_on_host(wheelhouse: str, present: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """Compare SHA256SUMS first: when it is the same, so are the wheels it lists."""
    items = package_files(Path(wheelhouse), list(present))
    sums = items[-1]
    state = host.get_fact(ops.PathStates, paths=(sums.dest,))
    if sums.matches(state.get(sums.dest, ("-",))):
        return
    yield from ops.ensure._inner(items=items)


class Installed(FactBase):
    """The SHA-1 of the wheelhouse list last installed into the venv, or None."""

    def command(self) -> str:
        return (
            f"test -x {HostPaths.VENV}/bin/pip && sha1sum < {INSTALLED_SUMS} | cut -c1-40 || true"
        )

    def process(self, output: list[str]) -> str | None:
        return output[0] if output and len(output[0]) == 40 else None


@operation()
def installed(wheelhouse: str):  # type: ignore[no-untyped-def]
    """The venv, and our wheels in it, unless exactly this wheelhouse is installed already."""
    if host.get_fact(Installed) == sums_sha1(Path(wheelhouse)):
        return
    yield f"test -x {HostPaths.VENV}/bin/pip || python3 -m venv {HostPaths.VENV}"
    yield from install_commands()


def restart_needed(current: str | None, new: str) -> bool:
    """True when a key the relay reads only at start (``gateway.config.RESTART_ONLY``:
    listen, spool, metrics_listen, delivery.concurrency) differs between the config on the
    host and the new one; a SIGHUP would not apply it."""
    if current is None:
        return False  # nothing runs with an old config: the start reads the new one
    try:
        old_config = parse_config(tomllib.loads(current))
    except (tomllib.TOMLDecodeError, ConfigError):
        return True
    new_config = parse_config(tomllib.loads(new))
    return bool(restart_only_changes(old_config, new_config))


@deploy("relay: package, config, unit")
def apply(fleet: Fleet, gateway: Gateway, reload_on: list[OperationMeta]) -> None:
    wheelhouse = build_wheelhouse()
    present = host.get_fact(FindFiles, path=HostPaths.WHEELHOUSE, maxdepth=1) or []
    current = host.get_fact(FileContents, path=HostPaths.CONFIG)
    new_config = fleet.relay_toml(gateway.name)
    config_needs_restart = restart_needed(
        "\n".join(current) if current is not None else None, new_config
    )
    wheelhouse_on_host(
        name="relay: the wheelhouse", wheelhouse=str(wheelhouse), present=tuple(present)
    )
    install = installed(name="relay: the venv with our wheels", wheelhouse=str(wheelhouse))
    config = ops.ensure(
        name=f"relay: {HostPaths.CONFIG}",
        items=[ops.File(HostPaths.CONFIG, new_config, group=HostPaths.USER, mode="640")],
    )
    unit = ops.ensure(name="relay: smg.service", items=[ops.File(UNIT, unit_file(gateway))])
    systemd.daemon_reload(name="systemd: daemon-reload for smg.service", _if=unit.did_change)

    code_or_unit = any_changed(install, unit)

    def restart_for() -> bool:
        return code_or_unit() or (config_needs_restart and config.did_change())

    reload_for = any_changed(config, *reload_on)
    systemd.service(
        name="relay: enabled and running", service="smg.service", running=True, enabled=True
    )
    systemd.service(
        name="relay: restart for new code or unit",
        service="smg.service",
        running=None,  # only the restart: never a start as well
        restarted=True,
        _if=restart_for,
    )
    systemd.service(
        name="relay: reload for the changed config (SIGHUP)",
        service="smg.service",
        running=None,  # only the reload: never a start as well
        reloaded=True,
        _if=_only(reload_for, unless=restart_for),
    )


def _only(condition: Callable[[], bool], unless: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: condition() and not unless()
