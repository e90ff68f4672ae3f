"""Our DKIM signatures verified by verifiers that are NOT dkimpy, against knot DNS.

- OpenDKIM 2.11 (`opendkim -t`, Debian): RSA and Ed25519; it resolves through libunbound,
  pointed at the test knotd by a stub zone.
- Perl Mail::DKIM (Debian libmail-dkim-perl 1.20230212): RSA only (that version has no
  Ed25519; it reports such signatures as unsupported, which this test checks too).

The TXT records are exactly the `zone:` lines `smg dkim keygen` printed.  Messages that went
through real `smg serve` instances are verified in tests/integration/test_routing.py with the
helpers below.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.dkim import DkimSigner
from tests.conftest import require_binaries
from tests.harness import free_port
from tests.harness.knot import KnotDNS

pytestmark = pytest.mark.integration

DOMAIN = "smg-dkim.test"
HEADERS = ["from", "to", "subject", "date", "message-id", "mime-version", "content-type"]

_MAIL_DKIM_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS;
my ($ns, $port) = @ARGV;
my $resolver = Net::DNS::Resolver->new(nameservers => [$ns], port => $port, recurse => 0,
    udp_timeout => 3, tcp_timeout => 3, retry => 1);
Mail::DKIM::DNS::resolver($resolver);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) { $line =~ s/\015?\012/\015\012/; $dkim->PRINT($line); }
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    printf "%s a=%s s=%s d=%s (%s)\n", $sig->result, $sig->algorithm, $sig->selector,
        $sig->domain, $sig->result_detail;
}
"""


def to_crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def opendkim_verify(raw: bytes, nameserver: str, zone: str, workdir: Path) -> dict[str, str]:
    """{selector: "pass" | "fail" | ...} for every signature, as OpenDKIM judges it."""
    require_binaries("opendkim")
    host, port = nameserver.split(":")
    workdir.mkdir(parents=True, exist_ok=True)
    unbound = workdir / "unbound.conf"
    # libunbound answers NXDOMAIN for .test by default (RFC 6761): undo that, ask knot.
    unbound.write_text(
        'server:\n  do-not-query-localhost: no\n  module-config: "iterator"\n'
        f'  local-zone: "test." nodefault\nstub-zone:\n  name: "{zone}"\n'
        f"  stub-addr: {host}@{port}\n"
    )
    conf = workdir / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nResolverConfiguration {unbound}\n")
    message = workdir / "message.eml"
    message.write_bytes(to_crlf(raw))
    run = subprocess.run(
        ["opendkim", "-x", str(conf), "-t", str(message), "-vv"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    found = re.findall(
        r"dkim=(\w+)[^\n]*?header\.a=\S+ header\.s=([^\s;]+)", run.stdout + run.stderr
    )
    return {selector: result for result, selector in found}


def mail_dkim_verify(raw: bytes, nameserver: str, workdir: Path) -> dict[str, str]:
    """{selector: "pass" | "fail" | "invalid" ...} as Perl Mail::DKIM judges it."""
    require_binaries("perl")
    script = workdir / "verify.pl"
    workdir.mkdir(parents=True, exist_ok=True)
    script.write_text(_MAIL_DKIM_VERIFY)
    host, port = nameserver.split(":")
    run = subprocess.run(
        ["perl", str(script), host, port], input=to_crlf(raw), capture_output=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()
    found = re.findall(r"^(\w+) a=\S+ s=(\S+) d=", run.stdout.decode(), re.M)
    return {selector: result for result, selector in found}


def keygen(out: Path, selector: str, algorithm: str, domain: str = DOMAIN) -> tuple[Path, str]:
    """Run `smg dkim keygen`; return the key path and the zone line it printed."""
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "dkim", "keygen", "--domain", domain,
         "--selector", selector, "--algorithm", algorithm, "--out", str(out)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    zone_line = re.search(r"^zone:  (.*)$", run.stdout, re.M).group(1)  # type: ignore[union-attr]
    return out / domain / f"{selector}.key", zone_line


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory, knot_dns: KnotDNS) -> DkimSigner:
    out = tmp_path_factory.mktemp("dkim-keys")
    keys, zone = [], []
    for selector, algorithm in (("rsa2026", "rsa"), ("ed2026", "ed25519"), ("old2025", "rsa")):
        path, line = keygen(out, selector, algorithm)
        keys.append({"domain": DOMAIN, "selector": selector, "key": str(path)})
        zone.append(line)
    knot_dns.set_zone(DOMAIN, "\n".join(zone) + "\n")
    config = parse_config(
        {"gateway": {"hostname": "mta01.example.net"}, "spam": {"enabled": False},
         "dkim": {"keys": keys, "headers": HEADERS}}
    )  # fmt: skip
    return DkimSigner.from_config(config.dkim)


def message(eol: bytes = b"\r\n") -> bytes:
    lines = [
        f"From: Alice <alice@{DOMAIN}>",
        "To: bob@example.net",
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and   figures",
        "Date: Mon, 01 Jan 2024 10:00:00 +0000",
        f"Message-ID: <dkim-1@{DOMAIN}>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "Hello Bob,   ",
        "",
        "the figures are attached.\t ",
        "",
        "",
    ]
    return eol.join(x.encode() for x in lines)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_opendkim_verifies_rsa_and_ed25519_rotation(
    signer: DkimSigner, knot_dns: KnotDNS, tmp_path: Path, eol: bytes
) -> None:
    signed = signer.sign(message(eol))
    assert signed.count(b"DKIM-Signature:") == 3
    results = opendkim_verify(signed, knot_dns.nameserver, DOMAIN, tmp_path)
    assert results == {"rsa2026": "pass", "ed2026": "pass", "old2025": "pass"}


def test_mail_dkim_verifies_rsa(signer: DkimSigner, knot_dns: KnotDNS, tmp_path: Path) -> None:
    signed = signer.sign(message())
    results = mail_dkim_verify(signed, knot_dns.nameserver, tmp_path)
    assert results["rsa2026"] == "pass" and results["old2025"] == "pass"
    # Debian 12's Mail::DKIM predates Ed25519: it must not call that one good either.
    assert results["ed2026"] != "pass"


def test_tampering_is_detected_by_both(
    signer: DkimSigner, knot_dns: KnotDNS, tmp_path: Path
) -> None:
    signed = signer.sign(message())
    tampered = signed.replace(b"the figures are attached.", b"the figures are different.")
    assert set(opendkim_verify(tampered, knot_dns.nameserver, DOMAIN, tmp_path).values()) == {
        "fail"
    }
    assert mail_dkim_verify(tampered, knot_dns.nameserver, tmp_path)["rsa2026"] == "fail"
    extra_from = b"From: mallory@evil.example\r\n" + signed
    oversigned = opendkim_verify(extra_from, knot_dns.nameserver, DOMAIN, tmp_path / "o")
    assert "pass" not in oversigned.values(), "a From: added later breaks every signature"


def test_smg_serve_refuses_to_start_with_a_readable_key(tmp_path: Path) -> None:
    key, _ = keygen(tmp_path / "keys", "loose", "rsa")
    key.chmod(0o640)
    config = tmp_path / "smg.toml"
    config.write_text(
        f'[gateway]\nhostname = "mta01.example.net"\nlisten = ["127.0.0.1:{free_port()}"]\n'
        f'spool = "{tmp_path / "spool"}"\n[virus]\nenabled = false\n[spam]\nenabled = false\n'
        f'[[dkim.keys]]\ndomain = "{DOMAIN}"\nselector = "loose"\nkey = "{key}"\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert str(key) in run.stderr + run.stdout and "chmod 600" in run.stderr + run.stdout
