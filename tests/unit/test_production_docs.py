"""The production inventory's shape with documentation addresses (issue 13): two good and two
bad gateways behind 1:1 NAT load through pyinfra's own inventory loader (the file validates
itself there, as in ``pyinfra ... deploy.py --dry``) and render every host's relay config and
firewall without error.  ``--dry`` itself needs SSH to each host for its facts, so the render
path stands in for it: the same functions deploy.py calls to make the files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from deploykit.inventory import load_inventory
from gateway.config import parse_config
from roles import firewall
from tests.harness import TestCA

KIT = Path(__file__).resolve().parents[2]
INVENTORY = KIT / "tests" / "inventories" / "production_docs.py"
HOSTS = {
    f"otc-de-mta{n:02d}": (f"198.51.100.{20 + n}", f"198.51.100.{130 + n}") for n in (1, 2, 3, 4)
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with keys/pki/ as production's group data names it."""
    root = tmp_path_factory.mktemp("production-docs")
    pki = root / "keys" / "pki"
    pki.mkdir(parents=True)
    ca = TestCA(root / "ca")
    shutil.copy(ca.ca_bundle, pki / "internal-ca.crt")
    for name, (public, private) in HOSTS.items():
        leaf = ca.valid(f"{name}.mms.t-systems-service.com", public, private)
        shutil.copy(leaf.cert_path, pki / f"{name}.crt")
        shutil.copy(leaf.key_path, pki / f"{name}.key")
        (pki / f"{name}.key").chmod(0o600)
    return root


def test_pyinfra_loads_it(workdir: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), str(INVENTORY), "debug-inventory"],
        cwd=workdir, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "PYTHONPATH": str(KIT)},  # deploykit is no installed package
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in HOSTS:
        assert name in done.stdout + done.stderr  # pyinfra prints its listing on stderr


def test_every_host_renders(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    fleet = load_inventory(INVENTORY)
    assert [(g.name, g.role) for g in fleet] == [
        ("otc-de-mta01", "good"), ("otc-de-mta02", "good"),
        ("otc-de-mta03", "bad"), ("otc-de-mta04", "bad"),
    ]  # fmt: skip
    for gateway in fleet:
        _, private = HOSTS[gateway.name]
        config = parse_config(tomllib.loads(fleet.relay_toml(gateway.name)), source=gateway.name)
        assert (private, 25) in config.gateway.listen
        assert config.gateway.source_address == private
        assert config.blacklist.addresses == [p for p, _ in HOSTS.values()]
        assert "table inet smg" in firewall.nftables_conf(fleet, gateway)
        if gateway.role == "good":
            assert config.routing.bad_gateways == [("198.51.100.133", 25), ("198.51.100.134", 25)]
        else:
            assert config.routing.good_gateways == ["198.51.100.131", "198.51.100.132"]
