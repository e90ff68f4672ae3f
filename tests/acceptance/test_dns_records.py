"""The fleet's DNS records as a change request checks them, on the lab (issue 13, point 4):
``python -m deploykit dns-check inventories/lab.py`` finds every record the lab publishes (each
customer's DKIM selector, the fleet's SPF, each gateway's PTR and forward name, the NATed one by
its public address, and TLSA records for customer-b's DANE rule); a record taken away is
reported MISSING with the zone-file line to publish, and that very line makes it ok again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab import dns as lab_dns
from lab.zones import default_zones

pytestmark = pytest.mark.lab

KIT = Path(__file__).resolve().parents[2]
CUSTOMER_B = "customer-b.example"


def dns_check() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploykit", "dns-check", "inventories/lab.py"],
        cwd=KIT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_every_lab_record_is_found() -> None:
    done = dns_check()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for line in (
        "ok      DKIM lab._domainkey.customer-a.example: published, matches the key",
        f"ok      DKIM lab._domainkey.{CUSTOMER_B}: published, matches the key",
        "ok      SPF spf.lab.example: lists every gateway's public address",
        "ok      PTR otc-de-mta04 198.51.100.13: names otc-de-mta04.lab.example",
        "ok      A otc-de-mta04.lab.example: has 198.51.100.13",
        "ok      TLSA partner-tls.example (dane rule): TLSA records for mx.partner-tls.example",
    ):
        assert line in out, out


def test_a_missing_dkim_record_is_printed_as_the_line_to_publish() -> None:
    served = lab_dns.zone_text(CUSTOMER_B)
    without_dkim = "".join(line + "\n" for line in served.splitlines() if "_domainkey" not in line)
    lab_dns.set_zone(CUSTOMER_B, without_dkim)
    try:
        done = dns_check()
        assert done.returncode == 3, done.stdout + done.stderr
        assert f"MISSING DKIM lab._domainkey.{CUSTOMER_B}: no DKIM TXT record" in done.stdout
        (line,) = [
            line for line in done.stdout.split("; to publish (zone-file lines):\n")[1].splitlines()
            if line.startswith(f"lab._domainkey.{CUSTOMER_B}.")
        ]  # fmt: skip
        lab_dns.set_zone(CUSTOMER_B, without_dkim + line + "\n")  # what the customer publishes
        again = dns_check()
        assert again.returncode == 0, again.stdout
    finally:
        lab_dns.set_zone(CUSTOMER_B, default_zones()[CUSTOMER_B])
