"""base: apt from the inventory's mirror (and proxy), the packages every role needs, the time
zone and the service user ``smg``."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files, server
from pyinfra.operations.util import any_changed

from gateway.inventory import Gateway, HostPaths
from roles.render import render, text_io

SUITE = "bookworm"
SOURCES = "/etc/apt/sources.list.d/debian.sources"
PROXY_CONF = "/etc/apt/apt.conf.d/01smg-proxy"
# What every gateway needs; the other roles add theirs (see deploy.py).
PACKAGES = [
    "ca-certificates",
    "tzdata",
    "iproute2",  # ss: the checks of tests/infra look at listening sockets with it
    "python3",
    "python3-venv",
]


def debian_sources(gateway: Gateway) -> str:
    return render(
        "base/debian.sources.j2",
        mirror=gateway["debian_mirror"],
        security_mirror=gateway["debian_security_mirror"],
        suite=SUITE,
    )


def apt_proxy_conf(gateway: Gateway) -> str | None:
    proxy = gateway["apt_proxy"]
    return render("base/apt-proxy.conf.j2", proxy=proxy) if proxy else None


def missing_packages(wanted: list[str]) -> list[str]:
    installed = host.get_fact(DebPackages) or {}
    return [name for name in wanted if name not in installed]


@deploy("base: apt sources, packages, time zone, service user")
def apply(gateway: Gateway, packages: list[str]) -> None:
    wanted = sorted(set(PACKAGES) | set(packages))
    missing = missing_packages(wanted)

    sources = files.put(
        name="apt: the Debian mirror of the inventory",
        src=text_io(debian_sources(gateway)),
        dest=SOURCES,
        mode="644",
    )
    # debootstrap and cloud images write this one; two sources for one archive confuse apt.
    legacy = files.file(
        name="apt: no /etc/apt/sources.list", path="/etc/apt/sources.list", present=False
    )
    proxy_text = apt_proxy_conf(gateway)
    if proxy_text:
        proxy = files.put(name="apt: proxy", src=text_io(proxy_text), dest=PROXY_CONF, mode="644")
    else:
        proxy = files.file(name="apt: no proxy", path=PROXY_CONF, present=False)

    sources_changed = any_changed(sources, legacy, proxy)
    apt.update(
        name="apt: update the package lists",
        _if=lambda: bool(missing) or sources_changed(),
    )
    apt.packages(name="apt: packages", packages=wanted, no_recommends=True)

    zone = gateway["timezone"]
    files.link(
        name=f"time zone {zone}", path="/etc/localtime", target=f"/usr/share/zoneinfo/{zone}"
    )
    files.put(
        name="time zone: /etc/timezone", src=text_io(zone + "\n"), dest="/etc/timezone", mode="644"
    )

    server.group(name="service group smg", group=HostPaths.USER, system=True)
    server.user(
        name="service user smg",
        user=HostPaths.USER,
        group=HostPaths.USER,
        home=HostPaths.STATE_DIR,
        shell="/usr/sbin/nologin",
        system=True,
        create_home=False,
    )
    for path, owner, mode in (
        (HostPaths.ETC, "root", "750"),
        (HostPaths.STATE_DIR, HostPaths.USER, "750"),
        (HostPaths.SPOOL, HostPaths.USER, "750"),
    ):
        files.directory(
            name=f"directory {path}", path=path, user=owner, group=HostPaths.USER, mode=mode
        )
