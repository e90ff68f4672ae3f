"""base: apt from the inventory's mirror (and proxy), the packages every role needs, the time
zone and the service user ``smg`` with its directories."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt

from deploykit.host import Gateway
from deploykit.paths import HostPaths
from roles import ops
from roles.render import render

SUITE = "bookworm"
SOURCES = "/etc/apt/sources.list.d/debian.sources"
PROXY_CONF = "/etc/apt/apt.conf.d/01smg-proxy"
# What every gateway needs; the other roles add theirs (see deploy.py).
PACKAGES = [
    "ca-certificates",
    "tzdata",
    "iproute2",  # ss: tests/infra looks at the listening sockets with it
    "netbase",  # /etc/protocols and /etc/services, which minimal images lack
    "python3",
    "python3-venv",
]


def apt_files(gateway: Gateway) -> list[ops.Wanted]:
    sources = render(
        "base/debian.sources.j2",
        mirror=gateway["debian_mirror"],
        security_mirror=gateway["debian_security_mirror"],
        suite=SUITE,
    )
    proxy = gateway["apt_proxy"]
    return [
        ops.File(SOURCES, sources),
        # debootstrap and cloud images write this one; two sources for one archive confuse apt.
        ops.Absent("/etc/apt/sources.list"),
        ops.File(PROXY_CONF, render("base/apt-proxy.conf.j2", proxy=proxy))
        if proxy
        else ops.Absent(PROXY_CONF),
    ]


def time_zone(gateway: Gateway) -> list[ops.Wanted]:
    zone = gateway["timezone"]
    return [
        ops.Link("/etc/localtime", f"/usr/share/zoneinfo/{zone}"),
        ops.File("/etc/timezone", zone + "\n"),
    ]


def directories() -> list[ops.Wanted]:
    user = HostPaths.USER
    return [
        ops.Directory(HostPaths.ETC, "root", user, "750"),
        ops.Directory(HostPaths.STATE_DIR, user, user, "750"),
        ops.Directory(HostPaths.SPOOL, user, user, "750"),
    ]


@deploy("base: apt sources, packages, time zone, service user")
def apply(gateway: Gateway, packages: list[str]) -> None:
    wanted = sorted(set(PACKAGES) | set(packages))
    installed = host.get_fact(DebPackages) or {}
    missing = [name for name in wanted if name not in installed]

    sources = ops.ensure(
        name=f"apt: mirror and proxy of the inventory; time zone {gateway['timezone']}",
        items=apt_files(gateway) + time_zone(gateway),
    )
    # A time zone change triggers an update too: rare, and cheaper than another operation.
    apt.update(
        name="apt: update the package lists",
        _if=lambda: bool(missing) or sources.did_change(),
    )
    apt.packages(name="apt: packages", packages=wanted, no_recommends=True)
    ops.system_user(name="service user smg", account=HostPaths.USER, home=HostPaths.STATE_DIR)
    ops.ensure(name="directories of smg", items=directories())
