"""The lab network: one bridge on the machine, one network namespace + veth per lab host."""

from __future__ import annotations

import logging
from pathlib import Path

from lab.config import (
    BRIDGE,
    BRIDGE_ADDR,
    NETNS_PREFIX,
    NETWORK,
    NFT_TABLE,
    PREFIX_LEN,
    PRIVATE_NETWORK,
    PRIVATE_ROUTER,
    Host,
)
from lab.proc import run

log = logging.getLogger("lab")

NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")  # `ip netns exec` bind-mounts files from here over /etc


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def ensure_bridge() -> None:
    if not link_exists(BRIDGE):
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{BRIDGE_ADDR}/{PREFIX_LEN}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    _ensure_no_way_out()


def _ensure_no_way_out() -> None:
    """Drop anything routed between the lab and the rest of the world (if forwarding is on).

    Traffic between lab hosts stays on the bridge and is not affected.
    """
    run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)
    rules = (
        f"table inet {NFT_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        f"    ip saddr {NETWORK} ip daddr != {NETWORK} drop\n"
        f"    ip daddr {NETWORK} ip saddr != {NETWORK} drop\n"
        "  }\n"
        "}\n"
    )
    run(["nft", "-f", "-"], input_text=rules)


def add_host(host: Host, *, resolv_conf: str | None = None) -> None:
    """Namespace + veth pair (host side on the bridge, eth0 inside) + address + default route;
    a host with a private address gets its NAT router instead (:func:`_add_nat_host`)."""
    ns = host.netns
    if not netns_exists(ns):
        run(["ip", "netns", "add", ns])
    if host.private:
        _add_nat_host(host)
    elif not link_exists(host.veth):
        run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    if not host.private:
        run(["ip", "link", "set", host.veth, "master", BRIDGE, "up"])
        inside = ["ip", "-n", ns]
        run([*inside, "addr", "replace", f"{host.address}/{PREFIX_LEN}", "dev", "eth0"])
        run([*inside, "link", "set", "eth0", "up"])
        run([*inside, "link", "set", "lo", "up"])
        run([*inside, "route", "replace", "default", "via", BRIDGE_ADDR])
    if resolv_conf is not None:
        # Processes run with `ip netns exec` see this file as their /etc/resolv.conf.
        etc = NETNS_ETC / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(resolv_conf)


# -- 1:1 NAT, as a cloud's elastic IP ------------------------------------------------------------


def nat_router_netns(host: Host) -> str:
    return f"{NETNS_PREFIX}nat{host.address.rsplit('.', 1)[1]}"


def _add_nat_host(host: Host) -> None:
    """The host's namespace gets ``host.private`` (PRIVATE_NETWORK) and a default route to its
    own NAT router namespace, which owns the public ``host.address`` on the bridge: traffic to
    the public address is DNATed to the private one; traffic from the private one to the world
    is SNATed to the public one, to the fleet's own hosts it keeps the private source (the fleet
    talks over the private network: docs/deploy.md).  Forwarding is switched on inside the
    router namespace only, never on the machine."""
    assert host.private is not None
    router, inner = nat_router_netns(host), f"smglab-p{host.address.rsplit('.', 1)[1]}"
    if not netns_exists(router):
        run(["ip", "netns", "add", router])
    if not link_exists(host.veth) and not _link_in(router, "eth0"):
        run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
             "netns", router])  # fmt: skip
    run(["ip", "link", "set", host.veth, "master", BRIDGE, "up"])
    if not _link_in(router, inner):
        run(["ip", "link", "add", inner, "netns", router, "type", "veth", "peer", "name", "eth0",
             "netns", host.netns])  # fmt: skip
    r = ["ip", "-n", router]
    run([*r, "addr", "replace", f"{host.address}/{PREFIX_LEN}", "dev", "eth0"])
    prefix = PRIVATE_NETWORK.split("/")[1]
    run([*r, "addr", "replace", f"{PRIVATE_ROUTER}/{prefix}", "dev", inner])
    for link in ("lo", "eth0", inner):
        run([*r, "link", "set", link, "up"])
    run([*r, "route", "replace", "default", "via", BRIDGE_ADDR])
    run(["ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    run(["ip", "netns", "exec", router, "nft", "-f", "-"], input_text=_nat_rules(host))
    inside = ["ip", "-n", host.netns]
    run([*inside, "addr", "replace", f"{host.private}/{prefix}", "dev", "eth0"])
    run([*inside, "link", "set", "eth0", "up"])
    run([*inside, "link", "set", "lo", "up"])
    run([*inside, "route", "replace", "default", "via", PRIVATE_ROUTER])


def _nat_rules(host: Host) -> str:
    from lab.config import GATEWAYS  # the fleet: reached without NAT, as in one cloud network

    fleet = ", ".join(g.address for g in GATEWAYS if g.address != host.address)
    return (
        "table ip smglab_nat\n"
        "delete table ip smglab_nat\n"
        "table ip smglab_nat {\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f"    ip daddr {host.address} dnat to {host.private}\n"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {host.private} ip daddr != {{ {fleet} }} snat to {host.address}\n"
        "  }\n"
        "}\n"
    )


def _link_in(netns: str, link: str) -> bool:
    if not netns_exists(netns):
        return False
    return run(["ip", "-n", netns, "link", "show", link], check=False).returncode == 0


def add_private_routes(gateways: tuple[Host, ...]) -> None:
    """Every gateway reaches a NATed gateway's private address through its NAT router (the
    cloud network's routing); far ends and the customer do not: they are the world."""
    for nat in (g for g in gateways if g.private):
        for other in (g for g in gateways if g is not nat and not g.private):
            run(["ip", "-n", other.netns, "route", "replace", f"{nat.private}/32", "via",
                 nat.address])  # fmt: skip


def remove_host(host: Host) -> None:
    if host.private and netns_exists(nat_router_netns(host)):
        run(["ip", "netns", "del", nat_router_netns(host)], check=False)
    if link_exists(host.veth):
        run(["ip", "link", "del", host.veth], check=False)
    if netns_exists(host.netns):
        run(["ip", "netns", "del", host.netns], check=False)
    _remove_netns_etc(host.netns)


def _remove_netns_etc(ns: str) -> None:
    etc = NETNS_ETC / ns
    if etc.is_dir():
        for f in etc.iterdir():
            f.unlink()
        etc.rmdir()


def remove_strays() -> None:
    """Namespaces named like ours that no longer match a configured host (renamed hosts)."""
    if NETNS_DIR.is_dir():
        for entry in NETNS_DIR.iterdir():
            if entry.name.startswith(NETNS_PREFIX):
                run(["ip", "netns", "del", entry.name], check=False)
    if NETNS_ETC.is_dir():
        for entry in NETNS_ETC.iterdir():
            if entry.name.startswith(NETNS_PREFIX):
                _remove_netns_etc(entry.name)


def remove_bridge() -> None:
    if link_exists(BRIDGE):
        run(["ip", "link", "del", BRIDGE], check=False)
    run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)


def netns_exec(host: Host, argv: list[str]) -> list[str]:
    """The argv that runs a command inside the host's namespace (with its /etc/netns files)."""
    return ["ip", "netns", "exec", host.netns, *argv]
