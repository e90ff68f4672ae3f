"""Bringing the whole lab up and down, in order, with cleanup after a failed `up`."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from lab import cacher, dns, farend, hosts, image, net, pki, sshkeys, state, zones
from lab.config import (
    ALL_HOSTS,
    APT_PROXY_URL,
    BRIDGE,
    BRIDGE_ADDR,
    CACHE_DIR,
    CUSTOMER,
    DNS_ADDR,
    DNS_PORT,
    DNSBL_ZONE,
    DOMAIN,
    FAR_ENDS,
    GATEWAYS,
    LAB_DIR,
    LOCK_FILE,
    LOG_DIR,
    NETNS_PREFIX,
    NETWORK,
    NSPAWN_RUNTIME_DIR,
    OTHER_CUSTOMERS,
    RUN_DIR,
    SSH_CONFIG,
    SSH_KEY,
    STATE_FILE,
)
from lab.hosts import NSPAWN_TMPFS_MARK
from lab.mounts import mount_points, unmount_under
from lab.proc import (
    LabError,
    daemon_pid,
    kill_exact,
    known_daemons,
    processes_mentioning,
    stop_daemon,
    wait_until,
)
from lab.zones import CUSTOMER_DOMAINS, NO_RECORDS_DOMAIN, NULL_MX_DOMAIN, NXDOMAIN_EXAMPLE

log = logging.getLogger("lab")

# What `up` starts with the run dir in its arguments (`ip` is `ip netns exec` before it execs).
OUR_PROGRAMS = frozenset({"systemd-nspawn", "knotd", "apt-cacher-ng", "master", "ip"})


@contextmanager
def locked() -> Iterator[None]:
    """One `up`/`down` at a time on this machine (bounded wait for the lock)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        for _ in range(600):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.5)
        else:
            raise LabError(f"another `python -m lab` holds {LOCK_FILE} for more than 5 minutes")
        yield


def is_up() -> bool:
    """Up = a state file, and every daemon it lists is still that same running process."""
    current = state.read()
    if current is None:
        return False
    return all(daemon_pid(name) is not None for name in current.get("daemons", []))


def up(*, rebuild_image: bool = False, keep_on_failure: bool = False) -> dict[str, Any]:
    with locked():
        if is_up():
            if rebuild_image:
                # The running hosts' overlays sit on the unpacked image: never swap it under them.
                raise LabError("the lab is up: `python -m lab down` before --rebuild-image")
            log.info("the lab is already up")
            return state.read() or {}
        if STATE_FILE.exists() or leftovers():
            log.info("cleaning up what a previous run left behind")
            _down()
        try:
            return _up(rebuild_image=rebuild_image)
        except BaseException:
            if keep_on_failure:
                log.error("up failed; left as is for inspection: run `python -m lab down`")
            else:
                log.error("up failed; cleaning up (logs kept in %s)", LOG_DIR)
                _down()
            raise


def _up(*, rebuild_image: bool) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started = time.monotonic()
    timings["image"] = image.ensure_base_root(rebuild=rebuild_image)
    shutil.rmtree(LOG_DIR, ignore_errors=True)  # logs of this run only
    LOG_DIR.mkdir(parents=True)

    step = time.monotonic()
    pki.ensure_ca()
    ca_pem = pki.CA_CERT.read_bytes()
    public_key = sshkeys.ensure_client_key()
    sshkeys.write_ssh_config()
    net.ensure_bridge()
    dns.start()
    cacher.start()
    timings["services"] = time.monotonic() - step

    step = time.monotonic()
    hosts.ensure_nspawn_runtime_dir()
    for host in GATEWAYS:
        net.add_host(host)
        hosts.prepare(host, authorized_key=public_key, ca_pem=ca_pem)
        hosts.boot(host)
    net.add_private_routes(GATEWAYS)
    # While the gateways boot: their certificates, the far ends and the customer.
    for host in GATEWAYS:
        # A NATed host's certificate names its private address too: the good gateways reach
        # a bad gateway there and verify it (docs/deploy.md, addresses behind NAT).
        addresses = [host.address] + ([host.private] if host.private else [])
        pki.issue(host.name, [host.fqdn, host.name], addresses)
    for host in FAR_ENDS:
        net.add_host(host, resolv_conf=hosts.resolv_conf())
    # `postfix check` (queue dirs, permissions) takes seconds of shell: run them side by side.
    with ThreadPoolExecutor(max_workers=len(FAR_ENDS)) as pool:
        for done in [pool.submit(farend.prepare, host) for host in FAR_ENDS]:
            done.result(timeout=120)
    # DANE: partner-tls's TLSA record names mx-tls's key, which exists from here on.
    dns.set_zone("partner-tls.example", zones.partner_zone("partner-tls.example",
                 zones.tlsa_for((pki.PKI_DIR / "certs" / "mx-tls.crt").read_bytes())))  # fmt: skip
    for host in FAR_ENDS:
        farend.start(host)
    net.add_host(CUSTOMER, resolv_conf=hosts.resolv_conf())
    for host in OTHER_CUSTOMERS:
        net.add_host(host, resolv_conf=hosts.resolv_conf())
    for host in FAR_ENDS:
        farend.wait_ready(host)
    for host in GATEWAYS:
        hosts.wait_ready(host)
    timings["hosts"] = time.monotonic() - step
    timings["total"] = time.monotonic() - started

    current = describe(timings)
    state.write(current)
    return state.read() or current


def describe(timings: dict[str, float]) -> dict[str, Any]:
    """The content of lab/run/state.json (documented in docs/lab.md)."""
    return {
        "up_since": datetime.now(UTC).isoformat(timespec="seconds"),
        "network": NETWORK,
        "bridge": {"name": BRIDGE, "address": BRIDGE_ADDR},
        "domain": DOMAIN,
        "ssh_config": str(SSH_CONFIG),
        "ssh_key": str(SSH_KEY),
        "hosts": {
            h.name: {
                "address": h.address,
                "private_address": h.private,
                "fqdn": h.fqdn,
                "role": h.role,
                "netns": h.netns,
                "root": str(hosts.root_dir(h)),
                "cert": str(pki.PKI_DIR / "certs" / f"{h.name}.crt"),
                "key": str(pki.PKI_DIR / "certs" / f"{h.name}.key"),
            }
            for h in GATEWAYS
        },
        "far_ends": {h.name: farend.describe(h) for h in FAR_ENDS},
        "customer": {
            "address": CUSTOMER.address,
            "netns": CUSTOMER.netns,
            "domains": CUSTOMER_DOMAINS,
        },
        # the other customer hosts (tenants): customer-b, customer-c (AUTH only), stranger
        "customers": {h.name: {"address": h.address, "netns": h.netns} for h in OTHER_CUSTOMERS},
        "dns": {
            "address": DNS_ADDR,
            "port": DNS_PORT,
            "zones": [z for z in dns.zones() if z != "."],
            "dnsbl_zone": DNSBL_ZONE,
            "no_records_domain": NO_RECORDS_DOMAIN,
            "null_mx_domain": NULL_MX_DOMAIN,
            "nxdomain_example": NXDOMAIN_EXAMPLE,
            "signed_zones": list(zones.SIGNED_ZONES),
            "trust_anchors": dns.trust_anchors(),
            "dane_bad_domain": zones.DANE_BAD_DOMAIN,
            "slow_domain": zones.SLOW_DOMAIN,
            "tlsrpt_mailbox": zones.TLSRPT_MAILBOX,
        },
        "apt_proxy": APT_PROXY_URL,
        "pki": {
            "ca_cert": str(pki.CA_CERT),
            "ca_key": str(pki.CA_KEY),
            "certs_dir": str(pki.PKI_DIR / "certs"),
        },
        "daemons": known_daemons(),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }


def down() -> None:
    with locked():
        _down()


def _down() -> None:
    """Remove everything the lab may have made, whether `up` finished or not. Idempotent."""
    for host in GATEWAYS:
        hosts.stop(host)
    for host in FAR_ENDS:
        farend.stop(host)
    for name in known_daemons():
        stop_daemon(name)
    _kill_strays()
    hosts.release_nspawn_runtime_dir()
    for host in ALL_HOSTS:
        net.remove_host(host)
    net.remove_strays()
    net.remove_bridge()
    unmount_under(RUN_DIR)
    unmount_under(CACHE_DIR / "build")
    _remove_run_dir()


def _kill_strays() -> None:
    """Processes started from the run dir whose pid file never got written (up killed at that
    very moment): SIGTERM, a bounded wait, then SIGKILL."""
    strays = processes_mentioning(RUN_DIR, OUR_PROGRAMS)
    if not strays:
        return
    log.warning("stopping %d process(es) started from %s without a pid file", len(strays), RUN_DIR)
    for pid, _ in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(LabError):
        wait_until(
            "strays to exit", lambda: not processes_mentioning(RUN_DIR, OUR_PROGRAMS), timeout=10
        )
    kill_exact(processes_mentioning(RUN_DIR, OUR_PROGRAMS))


def _remove_run_dir() -> None:
    """Everything but the logs, which explain a failed run."""
    if not RUN_DIR.exists():
        return
    for entry in RUN_DIR.iterdir():
        if entry == LOG_DIR:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def leftovers() -> list[str]:
    """What of the lab still exists on this machine (empty after a clean `down`)."""
    found = []
    if net.link_exists(BRIDGE):
        found.append(f"bridge {BRIDGE}")
    found += [f"veth {h.veth}" for h in ALL_HOSTS if net.link_exists(h.veth)]
    if net.NETNS_DIR.is_dir():
        found += [f"netns {p.name}" for p in net.NETNS_DIR.glob(f"{NETNS_PREFIX}*")]
    if net.NETNS_ETC.is_dir():
        found += [f"{p}" for p in net.NETNS_ETC.glob(f"{NETNS_PREFIX}*")]
    found += [f"daemon {n}" for n in known_daemons() if daemon_pid(n) is not None]
    found += [f"{h.name} init {i[0]}" for h in GATEWAYS if (i := hosts.recorded_init(h))]
    found += [f"process {pid}" for pid, _ in processes_mentioning(RUN_DIR, OUR_PROGRAMS)]
    found += [f"mount {p}" for p in mount_points() if LAB_DIR in p.parents]
    if NSPAWN_TMPFS_MARK.exists():
        found.append(f"tmpfs {NSPAWN_RUNTIME_DIR}")
    return found
