"""clamav: clamd on a Unix socket for the relay's virus check.  Signatures come from freshclam
against the mirror named in the inventory (``clamav_mirror``), or, when that is None (labs,
offline sites), from the signature set the kit ships (``clamav_signatures_dir``)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import FindFiles
from pyinfra.operations import server, systemd

from deploykit.host import Gateway
from deploykit.paths import HostPaths
from gateway.config import parse_size
from roles import ops
from roles.render import render

PACKAGES = ["clamav-daemon", "clamav-freshclam"]
DB_DIR = "/var/lib/clamav"
SIGNATURE_SUFFIXES = (".hdb", ".hsb", ".ndb", ".ldb", ".cdb", ".ign2", ".fp", ".sfp")
DROP_INS = (
    "/etc/systemd/system/clamav-daemon.service.d/smg-shipped-signatures.conf",
    "/etc/systemd/system/clamav-daemon.socket.d/smg-shipped-signatures.conf",
)
CLAMD = "clamav-daemon.service"
FRESHCLAM = "clamav-freshclam.service"


def clamd_conf(gateway: Gateway) -> str:
    # A little above the relay's limit: the message travels with its SMTP headers.
    limit = parse_size(gateway["relay_max_message_size"]) + 5 * 1024 * 1024
    return render(
        "clamav/clamd.conf.j2",
        socket=HostPaths.CLAMD_SOCKET,
        stream_max=f"{limit // 1024 // 1024}M",
    )


def freshclam_conf(mirror: str) -> str:
    if urlsplit(mirror).hostname == "database.clamav.net":
        return render(
            "clamav/freshclam.conf.j2", private_mirror=None, database_mirror="database.clamav.net"
        )
    return render("clamav/freshclam.conf.j2", private_mirror=mirror, database_mirror=None)


def shipped_signatures(gateway: Gateway) -> list[Path]:
    folder = Path(gateway["clamav_signatures_dir"])
    return sorted(p for p in folder.iterdir() if p.suffix in SIGNATURE_SUFFIXES)


def signature_files(gateway: Gateway) -> list[ops.Wanted]:
    return [
        ops.File(f"{DB_DIR}/{path.name}", src=path, user="clamav", group="clamav")
        for path in shipped_signatures(gateway)
    ]


def unit_drop_ins(shipped: bool) -> list[ops.Wanted]:
    """With the kit's signatures there is no main/daily database: lift the units' condition."""
    if shipped:
        return [ops.File(path, render("clamav/unconditional.conf.j2")) for path in DROP_INS]
    return [ops.Absent(path) for path in DROP_INS]


@deploy("clamav: clamd and its signatures")
def apply(gateway: Gateway) -> None:
    mirror = gateway["clamav_mirror"]
    have = [Path(p).name for p in host.get_fact(FindFiles, path=DB_DIR, maxdepth=1) or []]
    conf = ops.ensure(
        name="clamav: clamd.conf",
        items=[ops.File("/etc/clamav/clamd.conf", clamd_conf(gateway))],
    )
    drop_ins = ops.ensure(name="clamav: unit conditions", items=unit_drop_ins(mirror is None))
    systemd.daemon_reload(name="systemd: daemon-reload for clamav", _if=drop_ins.did_change)
    if mirror is None:
        signatures = ops.ensure(name="clamav: the kit's signatures", items=signature_files(gateway))
        systemd.service(
            name="freshclam: off (signatures shipped by the kit)",
            service=FRESHCLAM,
            running=False,
            enabled=False,
        )
    else:
        freshclam = ops.ensure(
            name="freshclam: the inventory's mirror",
            items=[ops.File("/etc/clamav/freshclam.conf", freshclam_conf(mirror))],
        )
        if not any(name.startswith(("main.", "daily.")) for name in have):
            server.shell(name="freshclam: first download", commands=["freshclam --quiet"])
        systemd.service(name="freshclam: on", service=FRESHCLAM, running=True, enabled=True)
        systemd.service(
            name="freshclam: restart for the changed config",
            service=FRESHCLAM,
            running=None,
            restarted=True,
            _if=freshclam.did_change,
        )
        signatures = None  # freshclam tells clamd itself (NotifyClamd)
    systemd.service(name="clamd: enabled and running", service=CLAMD, running=True, enabled=True)
    systemd.service(
        name="clamd: restart for the changed config",
        service=CLAMD,
        running=None,  # only the restart: never a start as well
        restarted=True,
        _if=conf.did_change,
    )
    if signatures is not None:
        systemd.service(
            name="clamd: reload the changed signatures",
            service=CLAMD,
            running=None,
            reloaded=True,
            _if=lambda: signatures.did_change() and not conf.did_change(),
        )
