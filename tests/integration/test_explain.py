"""`smg explain` as a process, with the real clamd, rspamd and knot DNS behind the config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.dkim import write_new_key
from tests.harness import EICAR, EICAR_SIGNATURE_PREFIX, Clamd
from tests.harness.knot import KnotDNS
from tests.harness.rspamd import GTUBE, Rspamd

pytestmark = pytest.mark.integration

SENDER_ZONE = "smg-explain.test"
MAIL = (
    "From: Alice <alice@smg-explain.test>\n"
    "To: bob@far-explain.test\n"
    "Subject: Minutes of the planning meeting\n"
    "Date: Mon, 01 Jan 2024 10:00:00 +0000\n"
    "Message-ID: <minutes-1@smg-explain.test>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    "Hello Bob,\n\nattached are the minutes of Monday's planning meeting. We agreed to move\n"
    "the release to the second week of March. Please send me your comments by Wednesday.\n\n"
    "Kind regards,\nAlice\n"
)


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, clamd: Clamd, rspamd: Rspamd, knot_dns: KnotDNS
) -> Path:
    # The domain resolves to the client (127.0.0.1): it may get the virus notice (issue 12).
    knot_dns.set_zone(SENDER_ZONE, "@ MX 10 mx\nmx A 198.51.100.20\n@ A 127.0.0.1\n")
    directory = tmp_path_factory.mktemp("explain")
    key, _ = write_new_key(directory / "keys", SENDER_ZONE, "s2026", "rsa")
    config = directory / "smg.toml"
    config.write_text(
        f"""
[gateway]
hostname = "mta01.smg-explain.test"
role = "good"
spool = "{directory / "spool"}"
[dns]
nameservers = ["{knot_dns.nameserver}"]
extra_public_networks = ["198.51.100.0/24"]
timeout = "2s"
[virus]
clamd = "unix:{clamd.socket_path}"
[spam]
rspamd_url = "{rspamd.url}"
[routing]
bad_gateways = ["127.0.0.31:2525"]
internal_ca = "{directory / "ca.pem"}"
[[dkim.keys]]
domain = "{SENDER_ZONE}"
selector = "s2026"
key = "{key}"
[[tls_policy.rules]]
sender = "{SENDER_ZONE}"
recipient = "forced-explain.test"
level = "verify"
on_failure = "hold"
"""
    )
    return directory


def explain(setup: Path, body: str, *extra: str, to: tuple[str, ...] = ("bob@far-explain.test",),
            sender: str = f"alice@{SENDER_ZONE}") -> subprocess.CompletedProcess[str]:  # fmt: skip
    message = setup / "message.eml"
    message.write_text(body)
    args = ["--config", str(setup / "smg.toml"), "--from", sender]
    for rcpt in to:
        args += ["--to", rcpt]
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "explain", *args, *extra, str(message)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ham_is_delivered_here_with_dkim_key_and_tls_per_recipient(setup: Path) -> None:
    run = explain(setup, MAIL, to=("bob@far-explain.test", "carol@forced-explain.test"))
    assert run.returncode == 0, run.stderr + run.stdout
    out = run.stdout
    assert "outcome:  delivered via this gateway" in out
    for rule in ("relay_control", "sender_domain", "recipient", "virus", "spam", "route"):
        assert f" {rule} " in out, rule
    assert f"DKIM:     d={SENDER_ZONE} s=s2026 (rsa-2048" in out
    assert "TLS:      bob@far-explain.test: opportunistic" in out
    assert "TLS:      carol@forced-explain.test: verify, on failure hold" in out


def test_gtube_is_rerouted_json(setup: Path) -> None:
    run = explain(setup, MAIL.replace("Hello Bob,", GTUBE.decode()), "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["outcome"] == "rerouted to the bad gateway"
    spam = next(s for s in result["steps"] if s["rule"] == "spam")
    assert spam["summary"].startswith("spam: score") and "GTUBE" in spam["summary"]
    assert result["dkim"][0].startswith(f"d={SENDER_ZONE} s=s2026")
    assert result["tls"]["bob@far-explain.test"].startswith("verify, to the bad gateway(s)")


def test_virus_is_rejected_and_says_who_gets_the_info_ndr(setup: Path) -> None:
    run = explain(setup, MAIL + EICAR.decode() + "\n")
    assert run.returncode == 1
    assert f"outcome:  rejected: 554 5.7.1 Virus found: {EICAR_SIGNATURE_PREFIX}" in run.stdout
    assert f"information NDR naming the virus would go to alice@{SENDER_ZONE}" in run.stdout
    assert "DKIM:" not in run.stdout


def test_unresolvable_sender_is_rejected_at_mail(setup: Path) -> None:
    run = explain(setup, MAIL, sender="alice@no-such-domain.test")
    assert run.returncode == 1
    assert "outcome:  rejected: 550 5.1.8 Sender Domain must resolve" in run.stdout
    assert "DATA" not in run.stdout


def test_bad_input_is_a_clear_error(setup: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "explain", "--config", str(setup / "none.toml"),
         "--from", "a@b.example", "--to", "c@d.example", str(setup / "none.eml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and "none.toml" in run.stderr
