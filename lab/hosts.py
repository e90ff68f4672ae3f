"""Gateway hosts: per-host overlayfs on the base image, booted with systemd-nspawn in its netns."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import uuid
from pathlib import Path

from lab import net
from lab.config import (
    APT_PROXY_URL,
    BASE_ROOT,
    DNS_ADDR,
    DOMAIN,
    NSPAWN_RUNTIME_DIR,
    RUN_DIR,
    Host,
)
from lab.mounts import is_mount_point, unmount_under
from lab.proc import (
    LabError,
    children_of,
    daemon_pid,
    is_zombie,
    kill_exact,
    log_tail,
    run,
    start_daemon,
    start_time,
    stop_daemon,
    wait_until,
)

log = logging.getLogger("lab")

NSPAWN_TMPFS_MARK = RUN_DIR / "nspawn-tmpfs-mounted"
LAB_CA_NAME = "smg-lab-ca"


def daemon_name(host: Host) -> str:
    return f"nspawn-{host.name}"


def root_dir(host: Host) -> Path:
    return host.run_dir / "root"


def resolv_conf() -> str:
    return f"nameserver {DNS_ADDR}\nsearch {DOMAIN}\noptions timeout:2 attempts:2\n"


def hosts_file(host: Host) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"{host.address}\t{host.fqdn} {host.name}")
    return "\n".join(lines) + "\n"


def ensure_nspawn_runtime_dir() -> None:
    """nspawn wants /run/systemd/nspawn (for its propagate dir); a tmpfs of our own there."""
    if is_mount_point(NSPAWN_RUNTIME_DIR):
        return
    NSPAWN_RUNTIME_DIR.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "smglab-nspawn", NSPAWN_RUNTIME_DIR])
    NSPAWN_TMPFS_MARK.write_text("mounted by python -m lab up\n")


def release_nspawn_runtime_dir() -> None:
    if NSPAWN_TMPFS_MARK.exists():
        unmount_under(NSPAWN_RUNTIME_DIR)
        NSPAWN_TMPFS_MARK.unlink()


def prepare(host: Host, *, authorized_key: str, ca_pem: bytes) -> None:
    """Overlay mount, then write what makes this host itself (goes into its upper layer)."""
    upper, work, root = host.run_dir / "upper", host.run_dir / "work", root_dir(host)
    for d in (upper, work, root):
        d.mkdir(parents=True, exist_ok=True)
    if not is_mount_point(root):
        options = f"lowerdir={BASE_ROOT},upperdir={upper},workdir={work}"
        run(["mount", "-t", "overlay", "overlay", "-o", options, root])
    etc = root / "etc"
    (etc / "hostname").write_text(host.name + "\n")
    (etc / "hosts").write_text(hosts_file(host))
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    resolv = etc / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(resolv_conf())
    (etc / "apt/apt.conf.d/01smglab-proxy").write_text(f'Acquire::http::Proxy "{APT_PROXY_URL}";\n')
    _install_authorized_key(root, authorized_key)
    _install_host_key(root, host)
    _trust_lab_ca(root, ca_pem)


def _install_authorized_key(root: Path, public_key: str) -> None:
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(public_key + "\n")
    keys.chmod(0o600)


def _install_host_key(root: Path, host: Host) -> None:
    key = root / "etc/ssh/ssh_host_ed25519_key"
    if key.exists():
        return
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.name}", "-f", key])


def _trust_lab_ca(root: Path, ca_pem: bytes) -> None:
    """Make the lab CA a trusted root, as a public CA is on the internet (what
    update-ca-certificates would do, without running anything in the host)."""
    local = root / "usr/local/share/ca-certificates" / f"{LAB_CA_NAME}.crt"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(ca_pem)
    certs = root / "etc/ssl/certs"
    bundle = certs / "ca-certificates.crt"
    text = bundle.read_bytes()
    if ca_pem not in text:
        bundle.write_bytes(text + ca_pem)
    pem_link = certs / f"{LAB_CA_NAME}.pem"
    pem_link.unlink(missing_ok=True)
    pem_link.symlink_to(f"/usr/local/share/ca-certificates/{LAB_CA_NAME}.crt")
    subject_hash = run(["openssl", "x509", "-hash", "-noout", "-in", local]).stdout.strip()
    hash_link = certs / f"{subject_hash}.0"
    hash_link.unlink(missing_ok=True)
    hash_link.symlink_to(f"{LAB_CA_NAME}.pem")


def boot(host: Host) -> int:
    if daemon_pid(daemon_name(host)) is not None:
        raise LabError(f"{host.name} is already booted")
    argv = [
        "systemd-nspawn",
        "-D",
        root_dir(host),
        "-M",
        host.name,
        "-b",
        "--register=no",
        "--keep-unit",
        "--console=passive",
        f"--network-namespace-path=/run/netns/{host.netns}",
        # nftables (the deploy's firewall role) needs it; it acts on the host's own netns only.
        "--capability=CAP_NET_ADMIN",
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
    ]
    pid = start_daemon(daemon_name(host), argv)
    # Keep the container's PID 1 too: if nspawn dies, it would outlive it (reparented to init).
    wait_until(
        f"{host.name}'s systemd to start", lambda: container_init(host) is not None, timeout=10
    )
    init = container_init(host)
    if init is None:  # nspawn exited in between
        raise LabError(f"{host.name}: systemd-nspawn exited\n{log_tail(daemon_name(host))}")
    _init_pid_file(host).write_text(f"{init[0]} {init[1]}\n")
    return pid


def _init_pid_file(host: Host) -> Path:
    return host.run_dir / "init.pid"


def recorded_init(host: Host) -> tuple[int, str] | None:
    """The container's PID 1 as recorded at boot, if that very process still runs."""
    try:
        pid_text, started = _init_pid_file(host).read_text().split()
    except (OSError, ValueError):
        return None
    if start_time(int(pid_text)) != started or is_zombie(int(pid_text)):
        return None
    return int(pid_text), started


def container_init(host: Host) -> tuple[int, str] | None:
    """(pid, start time) of the host's systemd (PID 1 inside), a child of nspawn."""
    pid = daemon_pid(daemon_name(host))
    if pid is None:
        return None
    for child in children_of(pid):
        try:
            comm = Path(f"/proc/{child[0]}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "systemd":
            return child
    return None


def in_host(host: Host, argv: list[str], *, timeout: float = 10) -> str:
    """Run a command inside the booted host via nsenter (no sshd needed); return stdout."""
    init = container_init(host)
    if init is None:
        raise LabError(f"{host.name}: container init not found")
    nsenter = ["nsenter", "-t", str(init[0]), "-m", "-u", "-i", "-n", "-p", "--"]
    return run([*nsenter, *argv], check=False, timeout=timeout).stdout.strip()


def system_state(host: Host) -> str:
    try:
        return in_host(host, ["systemctl", "is-system-running"], timeout=5) or "unknown"
    except LabError:
        return "unknown"


def sshd_answers(address: str, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_ready(host: Host, *, timeout: float = 90) -> None:
    """Bounded wait for systemd to finish booting (running/degraded) and sshd to answer."""
    name = daemon_name(host)

    def booted() -> bool:
        if daemon_pid(name) is None:
            raise LabError(f"{host.name}: systemd-nspawn exited\n{log_tail(name)}")
        return system_state(host) in ("running", "degraded")

    try:
        wait_until(f"{host.name} to boot", booted, timeout=timeout, interval=0.2)
        wait_until(f"sshd on {host.name}", lambda: sshd_answers(host.address), timeout=30)
    except LabError as exc:
        raise LabError(f"{exc}\nlast lines of {name}.log:\n{log_tail(name)}") from exc


def failed_units(host: Host) -> list[str]:
    out = in_host(host, ["systemctl", "list-units", "--failed", "--plain", "--no-legend"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def stop(host: Host) -> None:
    """Clean halt (SIGTERM to nspawn), bounded; then make sure the container's init is gone."""
    init = container_init(host) or recorded_init(host)
    if daemon_pid(daemon_name(host)) is None and init is not None:
        # nspawn is gone but the container's systemd lives on: ask it to power off (SIGRTMIN+4).
        os.kill(init[0], signal.SIGRTMIN + 4)
        with contextlib.suppress(LabError):
            wait_until(f"{host.name} to power off", lambda: recorded_init(host) is None, timeout=20)
    stop_daemon(daemon_name(host), timeout=20)
    if init is not None:
        # Still there after a timeout: SIGKILL to PID 1 of the container's PID namespace ends
        # everything inside it.
        kill_exact([init])
    unmount_under(host.run_dir)
    net.remove_host(host)


def remove_files(host: Host) -> None:
    unmount_under(host.run_dir)
    if host.run_dir.exists():
        shutil.rmtree(host.run_dir)
