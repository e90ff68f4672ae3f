"""DKIM signing: byte-identical to dkimpy, per From: domain, rotation, never twice, key modes.

Verification by a verifier that is not dkimpy (Mail::DKIM, OpenDKIM) against real DNS is in
tests/integration/test_dkim.py.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path
from unittest import mock

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gateway.cli import main as smg
from gateway.config import parse_config
from gateway.dkim import (
    DkimKeyError,
    DkimSigner,
    SigningKey,
    load_private_key,
    write_new_key,
)

NOW = 1_700_000_000
HEADERS = ["from", "to", "cc", "subject", "date", "message-id", "mime-version", "content-type"]


def message(from_: str = "Alice Example <alice@example.com>", eol: bytes = b"\r\n") -> bytes:
    lines = [
        f"From: {from_}",
        "To: bob@example.net",
        "Subject: quarterly   figures",
        "\tfolded onto a second line",
        "Date: Mon, 01 Jan 2024 10:00:00 +0000",
        "Message-ID: <figures-1@example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
    ]
    body = [f"line {i} of the report,   with  spaces   " for i in range(120)]
    return eol.join(x.encode() for x in lines + body) + eol + eol


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dkim")
    write_new_key(directory, "example.com", "rsa1", "rsa")
    write_new_key(directory, "example.com", "ed1", "ed25519")
    write_new_key(directory, "example.com", "rsa2", "rsa")
    write_new_key(directory, "other.org", "sel", "rsa")
    return directory


def key(keydir: Path, domain: str, selector: str) -> SigningKey:
    path = keydir / domain / f"{selector}.key"
    return SigningKey(domain, selector, path, load_private_key(path))


def dns_for(*keys: SigningKey):
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): k.dns_record() for k in keys}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name, "").encode()

    return dnsfunc


def dkimpy_private(k: SigningKey) -> bytes:
    """The key as dkimpy takes it: PEM for RSA, the base64 seed for Ed25519."""
    if isinstance(k.private_key, rsa.RSAPrivateKey):
        return k.path.read_bytes()
    raw = k.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
@pytest.mark.parametrize("selector", ["rsa1", "ed1"])
def test_signature_is_byte_identical_to_dkimpy(keydir: Path, selector: str, eol: bytes) -> None:
    k = key(keydir, "example.com", selector)
    signer = DkimSigner([k], HEADERS)
    data = message(eol=eol)
    ours = signer.signatures(data, [k], now=NOW)[0]
    include = [x.strip() for x in re.search(rb"h=([^;]*);", ours).group(1).split(b":")]  # type: ignore[union-attr]
    with mock.patch("time.time", return_value=NOW):
        theirs = dkimpy.sign(
            data,
            selector.encode(),
            b"example.com",
            dkimpy_private(k),
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[x.replace(b"\r\n", b"").replace(b"\n", b"") for x in include],
            signature_algorithm=k.algorithm,
            linesep=eol,
        )
    assert ours == theirs


def test_signed_headers_existing_only_from_oversigned(keydir: Path) -> None:
    signed = DkimSigner([key(keydir, "example.com", "rsa1")], HEADERS).sign(message(), now=NOW)
    tags = dkimpy.util.parse_tag_value(
        b"".join(signed.split(b"\r\n\r\n")[0].split())
        .split(b"DKIM-Signature:", 1)[1]
        .split(b"From:")[0]
    )
    names = tags[b"h"].split(b":")
    assert names == [
        b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
        b"from",
    ]  # fmt: skip
    assert b"cc" not in names, "headers that are not in the message are not listed"
    assert tags[b"c"] == b"relaxed/relaxed" and tags[b"d"] == b"example.com"


def test_rotation_signs_with_every_key_and_each_verifies(keydir: Path) -> None:
    keys = [key(keydir, "example.com", s) for s in ("rsa1", "rsa2", "ed1")]
    signed = DkimSigner(keys, HEADERS).sign(message())
    assert signed.count(b"DKIM-Signature:") == 3
    verifier = dkimpy.DKIM(signed)
    for index in range(3):
        assert verifier.verify(idx=index, dnsfunc=dns_for(*keys))


def test_key_chosen_by_from_header_domain_not_envelope(keydir: Path) -> None:
    signer = DkimSigner(
        [key(keydir, "example.com", "rsa1"), key(keydir, "other.org", "sel")], HEADERS
    )
    assert [k.domain for k in signer.keys_for(message("x@other.org"))] == ["other.org"]
    assert [k.domain for k in signer.keys_for(message('"A, B" <a@EXAMPLE.com>'))] == ["example.com"]
    unknown = message("someone@unknown.example")
    assert signer.sign(unknown) == unknown
    two_domains = message("a@example.com, b@other.org")
    assert signer.sign(two_domains) == two_domains


def test_never_signs_twice(keydir: Path) -> None:
    keys = [key(keydir, "example.com", "rsa1"), key(keydir, "example.com", "ed1")]
    signer = DkimSigner(keys, HEADERS)
    once = signer.sign(message())
    assert signer.sign(once) == once
    only_rsa = DkimSigner(keys[:1], HEADERS).sign(message())
    both = signer.sign(only_rsa)
    assert both.count(b"DKIM-Signature:") == 2 and both.endswith(only_rsa)


def test_message_without_from_or_with_garbage_header_is_left_alone(keydir: Path) -> None:
    signer = DkimSigner([key(keydir, "example.com", "rsa1")], HEADERS)
    for data in (b"Subject: no from\r\n\r\nbody\r\n", b"\x00\x01 not a header\r\n\r\nx\r\n"):
        assert signer.sign(data) == data


def test_group_or_world_readable_key_refuses_to_load(tmp_path: Path) -> None:
    path, _ = write_new_key(tmp_path, "example.com", "s1", "ed25519")
    assert path.stat().st_mode & 0o777 == 0o600
    for mode in (0o640, 0o604, 0o644):
        path.chmod(mode)
        with pytest.raises(DkimKeyError, match=re.escape(str(path))):
            load_private_key(path)
    path.chmod(0o600)
    assert isinstance(load_private_key(path), ed25519.Ed25519PrivateKey)


def test_from_config_names_every_bad_file(tmp_path: Path) -> None:
    good, _ = write_new_key(tmp_path, "example.com", "good", "rsa")
    loose, _ = write_new_key(tmp_path, "example.com", "loose", "rsa")
    loose.chmod(0o644)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    keys = [
        {"domain": "example.com", "selector": s, "key": str(p)}
        for s, p in (("good", good), ("loose", loose), ("g", garbage), ("m", tmp_path / "none"))
    ]
    cfg = parse_config({"gateway": {"hostname": "mta.example.net"}, "spam": {"enabled": False},
                        "dkim": {"keys": keys}})  # fmt: skip
    with pytest.raises(DkimKeyError) as caught:
        DkimSigner.from_config(cfg.dkim)
    text = str(caught.value)
    assert str(loose) in text and str(garbage) in text and str(tmp_path / "none") in text
    assert str(good) not in text


def test_dkimpy_and_rspamd_style_ed25519_seed_loads(tmp_path: Path) -> None:
    seed = os.urandom(32)
    path = tmp_path / "seed.key"
    path.write_bytes(base64.b64encode(seed) + b"\n")
    path.chmod(0o600)
    loaded = load_private_key(path)
    assert isinstance(loaded, ed25519.Ed25519PrivateKey)


def test_small_rsa_key_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.key"
    # cryptography refuses to make keys under 1024 bits; openssl still does.
    subprocess.run(["openssl", "genrsa", "-out", str(path), "768"], check=True, capture_output=True)
    path.chmod(0o600)
    with pytest.raises(DkimKeyError, match="too small"):
        load_private_key(path)


# -- smg dkim -----------------------------------------------------------------------------------


def test_cli_keygen_and_dns_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    args = ["dkim", "keygen", "--domain", "Example.COM", "--selector", "s2026", "--out", str(out)]
    assert smg([*args, "--algorithm", "rsa"]) == 0
    printed = capsys.readouterr().out
    path = out / "example.com" / "s2026.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert "name:  s2026._domainkey.example.com" in printed
    value = re.search(r"^value: (.*)$", printed, re.M).group(1)  # type: ignore[union-attr]
    assert value.startswith("v=DKIM1; k=rsa; p=MII")
    assert '"' in printed.split("zone:", 1)[1], "zone line splits the value into strings"

    assert smg([*args, "--algorithm", "rsa"]) == 1, "an existing key is never overwritten"
    assert "exists already" in capsys.readouterr().err

    record = ["dkim", "dns-record", str(path), "--domain", "example.com", "--selector", "s2026"]
    assert smg(record) == 0
    assert f"value: {value}" in capsys.readouterr().out

    assert smg([*args[:-1], str(tmp_path / "ed"), "--algorithm", "ed25519", "--json"]) == 0
    assert '"v=DKIM1; k=ed25519; p=' in capsys.readouterr().out

    path.chmod(0o644)
    assert smg(record) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_fast_paths_equal_dkimpys_canonicalization_and_parsing() -> None:
    import random

    from dkim.canonicalization import CanonicalizationPolicy

    from gateway.dkim import _parse, canonical_body

    relaxed = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    rng = random.Random(7)
    pieces = [b"word", b" ", b"  ", b"\t", b"\r\n", b"\n", b"\r", b" \r\n", b"\t\r\n", b"."]
    for _ in range(2000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))
        crlf_body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert canonical_body(crlf_body) == relaxed.canonicalize_body(crlf_body), crlf_body
        data = b"From: a@example.com\r\nSubject: x\r\n\t y\r\n\r\n" + body
        assert _parse(data) == dkimpy.rfc822_parse(data), data


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.com",
        "Alice <alice@Example.COM>",
        "  Alice Example <alice@example.com>  ",
        '"Example, Alice" <alice@example.com>',
        "=?utf-8?q?J=C3=BCrgen?= <j@example.com>",
        "alice@example.com (Alice)",
        "a@example.com, b@example.org",
        "a@example.com, b@example.com",
        "undisclosed-recipients:;",
        "<alice@example.com.>",
    ],
)
def test_from_domain_fast_path_agrees_with_the_full_parser(value: str) -> None:
    from email.utils import getaddresses

    from gateway.dkim import from_domain

    domains = {
        a.rpartition("@")[2].rstrip(".").lower() for _, a in getaddresses([value]) if "@" in a
    }
    expected = domains.pop() if len(domains) == 1 else None
    assert from_domain([(b"From", f" {value}\r\n".encode())]) == expected


def test_unicode_from_domain_matches_its_idna_key() -> None:
    from gateway.dkim import from_domain

    value = "Jürgen <j@bücher.example>".encode()
    assert from_domain([(b"From", b" " + value + b"\r\n")]) == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    "rest",
    [
        b"\r\nHello.\r\n",
        b"\r\nHello.\r\n\r\n\r\n",
        b"\r\nno end",
        b"\r\n",
        b"",
        b"\r\nrun  of spaces \r\n\tand a tab\r\n",
        b"\r\nbare\nLF\r\n",
    ],
    ids=["plain", "trailing", "no-eol", "empty", "no-body", "whitespace", "bare-lf"],
)
def test_header_signatures_hash_the_body_in_place(keydir: Path, rest: bytes) -> None:
    """The cleanup signs its new header block over the body where it lies; the fields are
    the ones ``sign`` puts on the whole message."""
    k = key(keydir, "example.com", "ed1")
    signer = DkimSigner([k], HEADERS)
    head = message().split(b"\r\n\r\n")[0] + b"\r\n"
    data = b"X-Old: dropped by the cleanup\r\n" + head + rest
    cut = len(data) - len(rest)
    with mock.patch("time.time", return_value=NOW):
        fields = signer.header_signatures(head, data, cut)
        whole = signer.sign(head + rest)
    assert fields and whole == fields + head + rest
