"""Bringing the whole lab up and down, in order, with cleanup after a failed `up`."""

from __future__ import annotations

import fcntl
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lab import hosts, image, net, pki, sshkeys, state
from lab.config import (
    BRIDGE,
    BRIDGE_ADDR,
    CACHE_DIR,
    GATEWAYS,
    LAB_DIR,
    LOCK_FILE,
    LOG_DIR,
    NETNS_PREFIX,
    NETWORK,
    NSPAWN_RUNTIME_DIR,
    RUN_DIR,
    SSH_CONFIG,
    SSH_KEY,
)
from lab.hosts import NSPAWN_TMPFS_MARK
from lab.mounts import mount_points, unmount_under
from lab.proc import LabError, daemon_pid, known_daemons, stop_daemon

log = logging.getLogger("lab")


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
    current = state.read()
    if current is None:
        return False
    return all(daemon_pid(name) is not None for name in current.get("daemons", []))


def up(*, rebuild_image: bool = False, keep_on_failure: bool = False) -> dict[str, Any]:
    with locked():
        if is_up():
            log.info("the lab is already up")
            return state.read() or {}
        if RUN_DIR.exists():
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
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)

    step = time.monotonic()
    pki.ensure_ca()
    ca_pem = pki.CA_CERT.read_bytes()
    public_key = sshkeys.ensure_client_key()
    sshkeys.write_ssh_config()
    net.ensure_bridge()
    hosts.ensure_nspawn_runtime_dir()
    for host in GATEWAYS:
        net.add_host(host)
        hosts.prepare(host, authorized_key=public_key, ca_pem=ca_pem)
    timings["prepare"] = time.monotonic() - step

    step = time.monotonic()
    for host in GATEWAYS:
        hosts.boot(host)
    for host in GATEWAYS:
        hosts.wait_ready(host)
    timings["boot"] = time.monotonic() - step
    timings["total"] = time.monotonic() - started

    current = _describe(timings)
    state.write(current)
    return current


def _describe(timings: dict[str, float]) -> dict[str, Any]:
    return {
        "network": NETWORK,
        "bridge": {"name": BRIDGE, "address": BRIDGE_ADDR},
        "ssh_config": str(SSH_CONFIG),
        "ssh_key": str(SSH_KEY),
        "hosts": {
            h.name: {
                "address": h.address,
                "fqdn": h.fqdn,
                "role": h.role,
                "kind": h.kind,
                "netns": h.netns,
                "root": str(hosts.root_dir(h)),
            }
            for h in GATEWAYS
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
    for name in known_daemons():
        stop_daemon(name)
    hosts.release_nspawn_runtime_dir()
    for host in GATEWAYS:
        net.remove_host(host)
    net.remove_strays()
    net.remove_bridge()
    unmount_under(RUN_DIR)
    unmount_under(CACHE_DIR / "build")
    _remove_run_dir()


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
    if net.NETNS_DIR.is_dir():
        found += [f"netns {p.name}" for p in net.NETNS_DIR.glob(f"{NETNS_PREFIX}*")]
    found += [f"daemon {n}" for n in known_daemons() if daemon_pid(n) is not None]
    found += [f"mount {p}" for p in mount_points() if LAB_DIR in p.parents]
    if NSPAWN_TMPFS_MARK.exists():
        found.append(f"tmpfs {NSPAWN_RUNTIME_DIR}")
    return found
