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
    """Namespace + veth pair (host side on the bridge, eth0 inside) + address + default route."""
    ns = host.netns
    if not netns_exists(ns):
        run(["ip", "netns", "add", ns])
    if not link_exists(host.veth):
        run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
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


def remove_host(host: Host) -> None:
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
