"""Static description of the lab: paths, addresses, hosts.

Everything the lab creates on this machine is named from here, so `down` can find and remove it
even when `up` died half way and left no state file behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
LAB_DIR = REPO_DIR / "lab"
RUN_DIR = LAB_DIR / "run"
CACHE_DIR = LAB_DIR / "cache"
LOG_DIR = RUN_DIR / "logs"
PID_DIR = RUN_DIR / "pids"
STATE_FILE = RUN_DIR / "state.json"
SSH_CONFIG = RUN_DIR / "ssh_config"
SSH_KEY = RUN_DIR / "ssh" / "id_ed25519"
PKI_DIR = RUN_DIR / "pki"
LOCK_FILE = CACHE_DIR / "lab.lock"
VENV_BIN = REPO_DIR / ".venv" / "bin"

BASE_TARBALL = CACHE_DIR / "base.tar.zst"
BASE_ROOT = CACHE_DIR / "base-root"  # the tarball unpacked: the read-only overlay lower layer
SUITE = "bookworm"
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "iproute2",
    "python3",
    "python3-venv",
    "sudo",
    "ca-certificates",
)
# Timers that take the dpkg lock in the middle of a deploy, or do nothing useful in a container.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)
HOST_APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")

# Network: only 198.51.100.0/24 (TEST-NET-2). Never 192.0.2.0/24 or 203.0.113.0/24.
NETWORK = "198.51.100.0/24"
PREFIX_LEN = 24
BRIDGE = "smglab0"
BRIDGE_ADDR = "198.51.100.1"
NFT_TABLE = "smglab"
NETNS_PREFIX = "smglab-"
# The lab's "private" cloud network for hosts behind NAT (inside TEST-NET-2 as well): a NATed
# host has an address here behind its own NAT router namespace (PRIVATE_ROUTER inside it).
PRIVATE_NETWORK = "198.51.100.128/25"
PRIVATE_ROUTER = "198.51.100.129"
NSPAWN_RUNTIME_DIR = Path("/run/systemd/nspawn")

DOMAIN = "lab.example"
DNS_ADDR = BRIDGE_ADDR
DNS_PORT = 53
DNSBL_ZONE = f"dnsbl.{DOMAIN}"
APT_PROXY_PORT = 3142
APT_PROXY_URL = f"http://{BRIDGE_ADDR}:{APT_PROXY_PORT}"


@dataclass(frozen=True)
class Host:
    """One lab machine: an nspawn gateway, a far-end MX or the customer, each in its netns."""

    name: str
    address: str
    kind: str  # "gateway" (systemd-nspawn), "far_end" (netns + Postfix), "customer" (netns)
    role: str  # gateways: "good" / "bad"; far ends: "tls" / "plain"; "customer"
    # Behind 1:1 NAT (as in the cloud): the host has this address in PRIVATE_NETWORK, its
    # `address` is the public one, owned by a NAT router namespace (lab/net.py).
    private: str | None = None

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.name}"

    @property
    def veth(self) -> str:
        # Interface names are limited to 15 characters: name the host side by the last octet.
        return f"smglab-v{self.address.rsplit('.', 1)[1]}"

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"

    @property
    def run_dir(self) -> Path:
        return RUN_DIR / "hosts" / self.name


GATEWAYS = (
    Host("otc-de-mta01", "198.51.100.10", "gateway", "good"),
    Host("otc-de-mta02", "198.51.100.11", "gateway", "good"),
    Host("otc-de-mta03", "198.51.100.12", "gateway", "bad"),
    # The second bad gateway, behind 1:1 NAT (issue 13).
    Host("otc-de-mta04", "198.51.100.13", "gateway", "bad", private="198.51.100.134"),
)
FAR_ENDS = (
    Host("mx-tls", "198.51.100.20", "far_end", "tls"),
    Host("mx-plain", "198.51.100.21", "far_end", "plain"),
)
CUSTOMER = Host("customer", "198.51.100.30", "customer", "customer")
# More customer hosts (issue 11, tenants): customer-b's own host, customer-c's AUTH-only host
# (in the inventory's auth_networks 198.51.100.40/29) and a host of no customer (554).
OTHER_CUSTOMERS = (
    Host("customer-b", "198.51.100.31", "customer", "customer"),
    Host("customer-c", "198.51.100.41", "customer", "customer"),
    Host("stranger", "198.51.100.35", "customer", "customer"),
)
ALL_HOSTS = (*GATEWAYS, *FAR_ENDS, CUSTOMER, *OTHER_CUSTOMERS)


def host_by_name(name: str) -> Host:
    for host in ALL_HOSTS:
        if name in (host.name, host.fqdn):
            return host
    known = ", ".join(h.name for h in ALL_HOSTS)
    raise KeyError(f"unknown lab host {name!r} (known: {known})")
