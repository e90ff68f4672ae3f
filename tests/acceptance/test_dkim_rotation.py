"""The DKIM key rotation of docs/dkim.md as a change request on the lab (issue 13, point 5):
add a selector, publish it, deploy: mail carries two signatures and both verify at the far
end; retire the old selector, deploy: one signature, the old key gone from the good gateways;
then the lab's own inventory again.

Inventories are copies edited the way an SRE edits them; keys are made with the kit's command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fleet import mail
from deploykit.paths import HostPaths
from lab import dns as lab_dns
from lab.zones import default_zones
from tests.acceptance.lab_fleet import Fleet, record
from tests.integration.test_deploy import deploy
from tests.integration.test_dkim import opendkim_verify

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

KIT = Path(__file__).resolve().parents[2]
DOMAIN, OLD, NEW = "customer-a.example", "lab", "lab2026"
# customer-a's keys are its tenant entry's "dkim" (inventories/lab.py, issue 11): a customer's
# mail is signed with its own keys only.
_ENTRY = '{{"domain": "{domain}", "selector": "{selector}", "algorithm": "rsa"}}'
OLD_ENTRY = _ENTRY.format(domain=DOMAIN, selector=OLD)
NEW_ENTRY = _ENTRY.format(domain=DOMAIN, selector=NEW)
OLD_LINE = f'        "dkim": [{OLD_ENTRY}],\n'


def inventory_copy(root: Path, *, keep_old: bool) -> Path:
    copy = root / ("overlap" if keep_old else "retired") / "inventories"
    shutil.copytree(KIT / "inventories", copy)
    text = (copy / "lab.py").read_text()
    assert OLD_LINE in text, "inventories/lab.py changed shape: adapt"
    entries = [OLD_ENTRY, NEW_ENTRY] if keep_old else [NEW_ENTRY]
    text = text.replace(OLD_LINE, f'        "dkim": [{", ".join(entries)}],\n', 1)
    (copy / "lab.py").write_text(text)
    return copy / "lab.py"


def keys(inventory: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "deploykit", "dkim-keys", str(inventory)],
                          cwd=KIT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.fixture
def rotation(tmp_path: Path, fleet: Fleet) -> Iterator[tuple[Path, Path]]:
    overlap, retired = (
        inventory_copy(tmp_path, keep_old=True),
        inventory_copy(tmp_path, keep_old=False),
    )
    keys(overlap)  # makes lab2026.key, rewrites keys/lab/dns-records.txt with both lines
    try:
        yield overlap, retired
    finally:
        (KIT / "keys" / "lab" / DOMAIN / f"{NEW}.key").unlink(missing_ok=True)
        keys(KIT / "inventories" / "lab.py")
        lab_dns.set_zone(DOMAIN, default_zones()[DOMAIN])
        restored = deploy(KIT / "inventories" / "lab.py")
        assert restored.errors == set(), restored.output[-3000:]


def signatures(fleet: Fleet, tmp: Path, name: str) -> dict[str, str]:
    tag = mail.new_tag(f"rotation-{name}")
    sent = fleet.send(fleet.gateways["otc-de-mta01"], "ham", tag, f"carol@{DOMAIN}",
                      f"{tag}@partner-plain.example")  # fmt: skip
    assert sent.accepted, sent.transcript
    (copy,) = fleet.arrived(tag, timeout=60)
    return opendkim_verify(copy.read(), fleet.dns_server, DOMAIN, tmp / name)


def test_rotation_overlap_then_retire(rotation, fleet: Fleet, tmp_path: Path) -> None:
    overlap, retired = rotation
    mta01 = fleet.gateways["otc-de-mta01"]
    # Not yet published: the deploy copies the key but does not sign with it.
    early = deploy(overlap)
    assert early.errors == set(), early.output[-3000:]
    assert f"not signing with {NEW}._domainkey.{DOMAIN} yet" in early.output
    assert signatures(fleet, tmp_path, "unpublished") == {OLD: "pass"}
    # Published (the lab serves keys/lab/dns-records.txt), deployed: two signatures.
    lab_dns.set_zone(DOMAIN, default_zones()[DOMAIN])
    both = deploy(overlap)
    assert both.errors == set(), both.output[-3000:]
    assert signatures(fleet, tmp_path, "overlap") == {OLD: "pass", NEW: "pass"}
    # Old selector retired: one signature, its key removed from the hosts.
    one = deploy(retired)
    assert one.errors == set(), one.output[-3000:]
    assert signatures(fleet, tmp_path, "retired") == {NEW: "pass"}
    old_key = HostPaths.dkim_key(DOMAIN, OLD)
    assert mta01.run(f"test -e {old_key}").rc == 1, "the retired key is gone from the host"
    record("dkim rotation", f"deploys: unpublished {early.seconds:.0f} s, overlap "
           f"{both.seconds:.0f} s, retire {one.seconds:.0f} s")  # fmt: skip
