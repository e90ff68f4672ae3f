"""DKIM signing time per 5 KB message: the relay's signer against pure dkimpy.

    .venv/bin/python bench/pipeline/dkim_sign.py [--messages 2000] [--size 5000]

Signs the same messages (From: at the key's domain, the relay's default header list) with:
- gateway.dkim.DkimSigner, RSA-2048 (digest signed by OpenSSL through `cryptography`);
- gateway.dkim.DkimSigner, Ed25519;
- dkimpy's own dkim.sign, RSA-2048 (pure Python RSA), relaxed/relaxed, same headers.
Prints median, p90 and p99 per message, and checks first that the relay's RSA signature is
byte-identical to dkimpy's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import dkim  # noqa: E402

from bench.common import make_message  # noqa: E402
from gateway.config import DkimSection  # noqa: E402
from gateway.dkim import DkimSigner, SigningKey, load_private_key, write_new_key  # noqa: E402

DOMAIN = "bench-sender.test"


def timings(sign, messages: list[bytes]) -> list[float]:
    result = []
    for data in messages:
        started = time.perf_counter()
        sign(data)
        result.append(time.perf_counter() - started)
    return result


def describe(name: str, samples: list[float]) -> str:
    samples = sorted(samples)
    p = lambda q: 1000 * samples[min(len(samples) - 1, int(len(samples) * q))]  # noqa: E731
    return (
        f"{name:<34} median {1000 * statistics.median(samples):6.3f} ms   "
        f"p90 {p(0.90):6.3f} ms   p99 {p(0.99):6.3f} ms   ({len(samples)} messages)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=5000)
    args = parser.parse_args()

    keydir = Path(tempfile.mkdtemp(prefix="smg-dkim-bench-"))
    rsa_path, _ = write_new_key(keydir, DOMAIN, "rsa", "rsa")
    ed_path, _ = write_new_key(keydir, DOMAIN, "ed", "ed25519")
    headers = DkimSection().headers
    rsa = DkimSigner([SigningKey(DOMAIN, "rsa", rsa_path, load_private_key(rsa_path))], headers)
    ed = DkimSigner([SigningKey(DOMAIN, "ed", ed_path, load_private_key(ed_path))], headers)
    rng = random.Random(5)
    messages = [make_message(i, args.size, rng) for i in range(args.messages)]
    pem = rsa_path.read_bytes()

    def dkimpy_sign(data: bytes) -> bytes:
        include = [h.encode() for h in headers if f"\n{h}:".encode() in b"\n" + data.lower()]
        return dkim.sign(data, b"rsa", DOMAIN.encode(), pem, canonicalize=(b"relaxed", b"relaxed"),
                         include_headers=[*include, b"from"])  # fmt: skip

    with mock.patch("time.time", return_value=1_700_000_000):
        ours = rsa.sign(messages[0], now=1_700_000_000)
        theirs = dkimpy_sign(messages[0]) + messages[0]
    print(f"RSA signature byte-identical to dkimpy's: {ours == theirs}")
    print(f"{args.size} B messages, Python {sys.version.split()[0]}")
    print(describe("smg DkimSigner RSA-2048", timings(rsa.sign, messages)))
    print(describe("smg DkimSigner Ed25519", timings(ed.sign, messages)))
    count = max(50, args.messages // 10)  # pure Python RSA is slow: fewer samples
    print(describe("dkimpy dkim.sign RSA-2048", timings(dkimpy_sign, messages[:count])))
    return 0 if ours == theirs else 1


if __name__ == "__main__":
    sys.exit(main())
