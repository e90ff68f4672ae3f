"""The deploy against the lab fleet: a re-run changes nothing, ``--dry`` changes nothing, and a
change request (a new DKIM domain in the inventory) changes exactly the operations it should,
reloading the relay without restarting it.

Needs the lab (``python -m lab up``, root).  Deploys run with a frozen copy of the wheelhouse
(``SMG_WHEELHOUSE``), so that code edited meanwhile in the working tree does not count as a
change here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploykit.paths import HostPaths
from lab import dns as lab_dns
from lab import fleet as lab_fleet
from lab.config import STATE_FILE
from roles import relay

KIT = Path(__file__).resolve().parents[2]
LAB_INVENTORY = KIT / "inventories" / "lab.py"
NEW_DOMAIN = "customer-d.example"  # of no lab customer (customer-c is a tenant)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]


@dataclass(frozen=True)
class Run:
    seconds: float
    changed: set[tuple[str, str]]  # (operation name, host)
    errors: set[tuple[str, str]]
    operations: int
    output: str


def deploy(inventory: Path, *extra: str, env: dict[str, str] | None = None) -> Run:
    """``pyinfra INVENTORY deploy.py -y --json``; which operations changed which host."""
    started = time.monotonic()
    done = subprocess.run(
        [str(KIT / ".venv/bin/pyinfra"), str(inventory), "deploy.py", "-y", "--json", *extra],
        cwd=KIT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    seconds = time.monotonic() - started
    try:
        results = json.loads(done.stdout)["results"]
    except (ValueError, KeyError, TypeError):
        pytest.fail(
            f"pyinfra exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    operations = results["operations"] if results else []
    changed = {(op["name"], h) for op in operations for h in op["success"]}
    errors = {(op["name"], h) for op in operations for h in op["error"]}
    total = sum(op["hosts"] for op in operations)
    return Run(seconds, changed, errors, total, done.stderr)


def short(changed: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Operation names without their deploy prefix ("relay: ... | relay: /etc/smg/smg.toml")."""
    return {(name.rsplit(" | ", 1)[-1], host) for name, host in changed}


def ssh(address: str, command: str, state: dict[str, Any]) -> str:
    done = subprocess.run(
        ["ssh", "-F", state["ssh_config"], address, command],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def lab() -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("the lab fleet needs root")
    if not lab_fleet.is_up():
        reason = f"the lab is not up ({STATE_FILE}): run .venv/bin/python -m lab up"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return json.loads(STATE_FILE.read_text())


@pytest.fixture(scope="module")
def frozen_wheels(tmp_path_factory: pytest.TempPathFactory, lab: dict[str, Any]) -> dict[str, str]:
    """The wheelhouse of this moment, copied: every deploy of this module installs it."""
    built = relay.build_wheelhouse()
    frozen = tmp_path_factory.mktemp("wheelhouse")
    shutil.copytree(built, frozen, dirs_exist_ok=True)
    return {"SMG_WHEELHOUSE": str(frozen)}


@pytest.fixture(scope="module")
def converged(lab: dict[str, Any], frozen_wheels: dict[str, str]) -> Run:
    """One deploy first, whatever it changes, so the lab is where the inventory says."""
    keygen = subprocess.run(
        [sys.executable, "-m", "deploykit", "dkim-keys", str(LAB_INVENTORY)],
        cwd=KIT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert keygen.returncode == 0, keygen.stderr
    run = deploy(LAB_INVENTORY, env=frozen_wheels)
    assert run.errors == set(), run.output[-3000:]
    return run


def test_a_second_deploy_changes_nothing(converged: Run, frozen_wheels: dict[str, str]) -> None:
    again = deploy(LAB_INVENTORY, env=frozen_wheels)
    print(f"\nno-change re-run: {again.seconds:.1f} s, {again.operations} operations")
    assert again.errors == set()
    assert again.changed == set()
    assert again.seconds < 60  # docs/deploy.md records the figure; 10 s is the aim


@pytest.fixture
def change_request(tmp_path: Path, lab: dict[str, Any], converged: Run) -> Iterator[Path]:
    """A copy of the inventories with a new DKIM domain in the lab's data, as an SRE edits it,
    and its key made with the kit's command; everything undone afterwards."""
    copy = tmp_path / "inventories"
    shutil.copytree(KIT / "inventories", copy)
    inventory = copy / "lab.py"
    text = inventory.read_text()
    anchor = '"dkim_domains": [\n'
    assert anchor in text, "inventories/lab.py changed shape: adapt this test"
    entry = f'            {{"domain": "{NEW_DOMAIN}", "selector": "lab", "algorithm": "rsa"}},\n'
    inventory.write_text(text.replace(anchor, anchor + entry, 1))
    keys_dir = KIT / "keys" / "lab"
    made = subprocess.run(
        [sys.executable, "-m", "deploykit", "dkim-keys", str(inventory)],
        cwd=KIT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    # The customer publishes the record: the deploy signs only with published keys.
    records = (keys_dir / "dns-records.txt").read_text().splitlines()
    mine = [line for line in records if line.split()[:1] == [f"lab._domainkey.{NEW_DOMAIN}."]]
    assert len(mine) == 1, records
    lab_dns.set_zone(NEW_DOMAIN, f"@ A {lab['customer']['address']}\n{mine[0]}\n")
    try:
        yield inventory
    finally:
        lab_dns.remove_zone(NEW_DOMAIN)
        shutil.rmtree(keys_dir / NEW_DOMAIN, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "deploykit", "dkim-keys", str(LAB_INVENTORY)],
            cwd=KIT,
            timeout=120,
            check=False,
        )


def test_dry_run_shows_the_change_and_makes_none(change_request: Path, lab: dict[str, Any]) -> None:
    done = subprocess.run(
        [str(KIT / ".venv/bin/pyinfra"), str(change_request), "deploy.py", "--dry"],
        cwd=KIT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dkim: keys (0600 smg), none other" in done.stderr
    key = HostPaths.dkim_key(NEW_DOMAIN, "lab")
    mta01 = lab["hosts"]["otc-de-mta01"]["address"]
    assert ssh(mta01, f"test -e {key} && echo there || echo absent", lab) == "absent"


def test_a_new_dkim_domain_changes_only_what_it_should(
    change_request: Path, lab: dict[str, Any], frozen_wheels: dict[str, str]
) -> None:
    good = [name for name, host in lab["hosts"].items() if host["role"] == "good"]
    expected = {
        (op, host)
        for host in good
        for op in (
            "dkim: keys (0600 smg), none other",
            f"relay: {HostPaths.CONFIG}",
            "relay: reload for the changed config (SIGHUP)",
        )
    }
    mta01 = lab["hosts"]["otc-de-mta01"]["address"]
    pid_before = ssh(mta01, "systemctl show -p MainPID --value smg.service", lab)
    key = HostPaths.dkim_key(NEW_DOMAIN, "lab")
    try:
        run = deploy(change_request, env=frozen_wheels)
        print(f"\nchange request: {run.seconds:.1f} s, changed: {sorted(short(run.changed))}")
        assert run.errors == set()
        assert short(run.changed) == expected
        assert ssh(mta01, f"stat -c '%U %G %a' {key}", lab) == "smg smg 600"
        assert NEW_DOMAIN in ssh(mta01, f"cat {HostPaths.CONFIG}", lab)
        # Reloaded, not restarted: same process, sessions and queue untouched.
        assert ssh(mta01, "systemctl show -p MainPID --value smg.service", lab) == pid_before
        assert ssh(mta01, "systemctl is-active smg.service", lab) == "active"
    finally:
        restored = deploy(LAB_INVENTORY, env=frozen_wheels)
    assert restored.errors == set()
    assert short(restored.changed) == expected  # the key removed, the config back, a reload
    assert ssh(mta01, f"test -e {key} && echo there || echo absent", lab) == "absent"
