"""The lab fleet is up: each gateway boots systemd, has its name and address, resolves lab
names through the lab DNS and installs packages through the cacher; the lab's internet answers.
"""

from __future__ import annotations

import smtplib
import socket
from typing import Any

import pytest

from lab import dns
from lab.config import PRIVATE_ROUTER

pytestmark = pytest.mark.lab


def test_gateway_runs_systemd(gateway: Any) -> None:
    state = gateway.run("systemctl is-system-running").stdout.strip()
    assert state in ("running", "degraded"), state
    assert gateway.service("ssh").is_running


def test_gateway_has_its_name_and_address(gateway: Any, lab_state: dict[str, Any]) -> None:
    expected = lab_state["hosts"][gateway.lab_name]
    assert gateway.check_output("hostname") == gateway.lab_name
    addresses = gateway.check_output("ip -4 -o addr show dev eth0")
    default = gateway.check_output("ip -4 route show default")
    if expected.get("private_address"):  # behind the lab's 1:1 NAT: only the private address
        assert f" {expected['private_address']}/25 " in addresses
        assert f" {expected['address']}/" not in addresses  # .13 is a prefix of .134
        assert default.startswith(f"default via {PRIVATE_ROUTER} ")
        return
    assert f" {expected['address']}/24 " in addresses
    assert default.startswith(f"default via {lab_state['bridge']['address']} ")


def test_gateway_resolves_lab_names(gateway: Any, lab_state: dict[str, Any]) -> None:
    assert gateway.file("/etc/resolv.conf").contains(f"nameserver {lab_state['dns']['address']}")
    for facts in lab_state["hosts"].values():
        assert gateway.check_output(f"getent hosts {facts['fqdn']}").split()[0] == facts["address"]
    mx_tls = lab_state["far_ends"]["mx-tls"]
    assert gateway.check_output(f"getent hosts {mx_tls['fqdn']}").split()[0] == mx_tls["address"]
    # A name in no zone fails at once (NXDOMAIN from the root zone), it does not time out.
    missing = gateway.run(f"timeout 3 getent hosts {lab_state['dns']['nxdomain_example']}")
    assert missing.rc == 2, missing


def test_gateway_apt_update_through_cacher(gateway: Any, lab_state: dict[str, Any]) -> None:
    proxy = gateway.file("/etc/apt/apt.conf.d/01smglab-proxy")
    assert proxy.contains(lab_state["apt_proxy"])
    update = gateway.run("timeout 120 apt-get update -o Acquire::Retries=0")
    assert update.rc == 0, update.stderr
    assert "Err:" not in update.stdout, update.stdout


def test_lab_dns_answers_from_this_machine(lab_state: dict[str, Any]) -> None:
    reply = dns.query("partner-tls.example", "MX")
    assert [str(r.exchange) for r in reply.answer[0]] == ["mx.partner-tls.example."]
    assert dns.query(lab_state["dns"]["nxdomain_example"], "A").rcode() == 3  # NXDOMAIN


@pytest.mark.parametrize("far_end", ["mx-tls", "mx-plain"])
def test_far_end_answers_smtp(far_end: str, lab_state: dict[str, Any]) -> None:
    facts = lab_state["far_ends"][far_end]
    with smtplib.SMTP(facts["address"], 25, timeout=5) as smtp:
        code, _ = smtp.ehlo("lab-test.lab.example")
        assert code == 250
        assert smtp.has_extn("starttls") is facts["starttls"]


def test_cacher_listens(lab_state: dict[str, Any]) -> None:
    host, port = lab_state["apt_proxy"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=3):
        pass
