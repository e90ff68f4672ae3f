"""Owners of active messages under the systemd sandbox (issue 12): the unit hides /proc/sys
(``ProcSubset=pid``) and passes the boot id as ``SMG_BOOT_ID=%b`` instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.queue import owners


def test_the_boot_id_from_the_unit_is_the_one_in_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    in_proc = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    monkeypatch.setenv("SMG_BOOT_ID", in_proc.replace("-", ""))  # systemd's %b: no hyphens
    assert owners._boot_id() == in_proc[:8]


def test_an_owner_of_this_boot_is_alive_with_the_boot_id_from_the_unit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(owners, "_owner_cache", None)
    monkeypatch.setenv("SMG_BOOT_ID", "0123456789abcdef0123456789abcdef")
    owner = owners.process_owner()
    assert owner.startswith(f"01234567:{os.getpid()}:")
    assert owners.owner_alive(owner)
    monkeypatch.setenv("SMG_BOOT_ID", "fedcba9876543210fedcba9876543210")  # another boot
    assert not owners.owner_alive(owner)
