"""The base image: debootstrap minbase + what a booted, SSH-reachable host needs.

Built once and cached as lab/cache/base.tar.zst, unpacked to lab/cache/base-root which every host
uses read-only as its overlayfs lower layer.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from lab.config import (
    BASE_PACKAGES,
    BASE_ROOT,
    BASE_TARBALL,
    CACHE_DIR,
    HOST_APT_SOURCES,
    MASKED_UNITS,
    SUITE,
)
from lab.mounts import unmount_under
from lab.proc import LabError, run

log = logging.getLogger("lab")

BUILD_DIR = CACHE_DIR / "build"
STAMP = ".smglab-base-stamp"  # in the unpacked root: which tarball it came from


def debian_mirror(sources: Path = HOST_APT_SOURCES) -> str:
    """The Debian mirror this machine's apt uses (the main archive, not the security one)."""
    try:
        text = sources.read_text()
    except OSError as exc:
        raise LabError(f"cannot read {sources} to find the Debian mirror: {exc}") from exc
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(
            (key.strip().lower(), value.strip())
            for key, _, value in (
                line.partition(":") for line in stanza.splitlines() if not line.startswith("#")
            )
            if value
        )
        if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
            return fields["uris"].split()[0]
    raise LabError(f"no 'deb' stanza for suite {SUITE} in {sources}")


def ensure_base_root(*, rebuild: bool = False) -> float:
    """Make BASE_ROOT current (build the tarball first if needed); return seconds spent."""
    started = time.monotonic()
    if rebuild or not BASE_TARBALL.exists():
        build_tarball()
    stamp = _tarball_stamp()
    stamp_file = BASE_ROOT / STAMP
    if not (stamp_file.exists() and stamp_file.read_text() == stamp):
        _unpack(stamp)
    return time.monotonic() - started


def _tarball_stamp() -> str:
    st = BASE_TARBALL.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _unpack(stamp: str) -> None:
    log.info("unpacking %s", BASE_TARBALL)
    tmp = CACHE_DIR / "base-root.new"
    _remove_tree(tmp)
    tmp.mkdir(parents=True)
    run(["tar", "--zstd", "-xpf", BASE_TARBALL, "-C", tmp, "--numeric-owner"], timeout=300)
    (tmp / STAMP).write_text(stamp)
    _remove_tree(BASE_ROOT)
    tmp.rename(BASE_ROOT)


def build_tarball() -> None:
    """debootstrap + customise + pack. Cold: about a minute on this machine."""
    mirror = debian_mirror()
    log.info("building the base image with debootstrap from %s (takes a minute)", mirror)
    _remove_tree(BUILD_DIR)
    BUILD_DIR.mkdir(parents=True)
    root = BUILD_DIR / "root"
    try:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                root,
                mirror,
            ],
            timeout=900,
        )
        customise(root)
        tmp_tar = BUILD_DIR / "base.tar.zst"
        # Numeric owners and xattrs (file capabilities) must survive the round trip.
        run(
            ["tar", "--zstd", "-cpf", tmp_tar, "--numeric-owner", "--xattrs", "-C", root, "."],
            timeout=600,
        )
        tmp_tar.rename(BASE_TARBALL)
    finally:
        unmount_under(BUILD_DIR)
        _remove_tree(BUILD_DIR)


def customise(root: Path) -> None:
    """What every host shares: masked timers, no host keys, no machine id, sshd settings."""
    systemd_dir = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = systemd_dir / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # Empty machine-id: each host gets its own in its overlay before boot.
    (root / "etc/machine-id").write_text("")
    sshd_dir = root / "etc/ssh/sshd_config.d"
    sshd_dir.mkdir(parents=True, exist_ok=True)
    (sshd_dir / "smglab.conf").write_text(
        "# Lab host: key-only root login, no reverse DNS (faster logins), ed25519 host key only.\n"
        "UseDNS no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
    )
    # The same suites as this machine (bookworm, -updates, -security), fetched via the cacher.
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    shutil.copyfile(HOST_APT_SOURCES, root / "etc/apt/sources.list.d/debian.sources")
    _remove_tree(root / "var/lib/apt/lists", keep_dir=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    for leftover in (root / "var/cache/apt").glob("*.bin"):
        leftover.unlink()


def _remove_tree(path: Path, *, keep_dir: bool = False) -> None:
    if not path.exists() and not path.is_symlink():
        return
    unmount_under(path)  # never delete through a live mount
    if keep_dir:
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        (path / "partial").mkdir(exist_ok=True)
        return
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else os.unlink(path)
