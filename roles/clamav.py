"""clamav: clamd on a Unix socket for the relay's virus check.  Signatures come from freshclam
against the mirror named in the inventory (``clamav_mirror``), or, when that is None (labs,
offline sites), from the signature set the kit ships (``clamav_signatures_dir``)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import FindFiles
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from gateway.config import parse_size
from gateway.inventory import Gateway, HostPaths
from roles.render import render, text_io

PACKAGES = ["clamav-daemon", "clamav-freshclam"]
DB_DIR = "/var/lib/clamav"
SIGNATURE_SUFFIXES = (
    ".hdb",
    ".hsb",
    ".ndb",
    ".ldb",
    ".cdb",
    ".ign2",
    ".fp",
    ".sfp",
    ".cvd",
    ".cld",
)
DROP_INS = (
    "/etc/systemd/system/clamav-daemon.service.d/smg-shipped-signatures.conf",
    "/etc/systemd/system/clamav-daemon.socket.d/smg-shipped-signatures.conf",
)


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


@deploy("clamav: clamd and its signatures")
def apply(gateway: Gateway) -> None:
    conf = files.put(
        name="clamav: clamd.conf",
        src=text_io(clamd_conf(gateway)),
        dest="/etc/clamav/clamd.conf",
        mode="644",
    )
    mirror = gateway["clamav_mirror"]
    signatures = _shipped(gateway) if mirror is None else _from_mirror(mirror)
    systemd.service(
        name="clamd: enabled and running",
        service="clamav-daemon.service",
        running=True,
        enabled=True,
    )
    systemd.service(
        name="clamd: restart for the changed config",
        service="clamav-daemon.service",
        restarted=True,
        _if=conf.did_change,
    )
    systemd.service(
        name="clamd: reload the changed signatures",
        service="clamav-daemon.service",
        reloaded=True,
        _if=lambda: signatures() and not conf.did_change(),
    )


def _shipped(gateway: Gateway):
    """The kit's signature set; freshclam off; clamd starts without main/daily."""
    shipped = shipped_signatures(gateway)
    puts = [
        files.put(
            name=f"clamav: signatures {path.name}",
            src=str(path),
            dest=f"{DB_DIR}/{path.name}",
            user="clamav",
            group="clamav",
            mode="644",
        )
        for path in shipped
    ]
    drop_ins = [
        files.put(
            name=f"clamav: {path}",
            src=text_io(render("clamav/unconditional.conf.j2")),
            dest=path,
            mode="644",
        )
        for path in DROP_INS
    ]
    systemd.daemon_reload(name="systemd: daemon-reload for clamav", _if=any_changed(*drop_ins))
    systemd.service(
        name="freshclam: off (signatures shipped by the kit)",
        service="clamav-freshclam.service",
        running=False,
        enabled=False,
    )
    return any_changed(*puts)


def _from_mirror(mirror: str):
    """freshclam against the inventory's mirror; the first run waits for the signatures."""
    have = host.get_fact(FindFiles, path=DB_DIR, maxdepth=1) or []
    conf = files.put(
        name="freshclam: freshclam.conf",
        src=text_io(freshclam_conf(mirror)),
        dest="/etc/clamav/freshclam.conf",
        mode="644",
    )
    removed = [files.file(name=f"clamav: no {path}", path=path, present=False) for path in DROP_INS]
    systemd.daemon_reload(name="systemd: daemon-reload for clamav", _if=any_changed(*removed))
    if not any(Path(p).name.startswith(("main.", "daily.")) for p in have):
        server.shell(name="freshclam: first download", commands=["freshclam --quiet"])
    systemd.service(
        name="freshclam: enabled", service="clamav-freshclam.service", running=True, enabled=True
    )
    systemd.service(
        name="freshclam: restart for the changed config",
        service="clamav-freshclam.service",
        restarted=True,
        _if=conf.did_change,
    )
    return lambda: False  # freshclam tells clamd itself (NotifyClamd)
