"""gateway.tls.mta_sts: parsing, MX matching, and discovery + HTTPS fetch + caching (RFC 8461).

The DNS side is the in-process fake DNS server through the real gateway.dns.Resolver; the
HTTPS side is :class:`PolicyServer`, a local http.server over TLS with a TestCA certificate for
``mta-sts.<domain>`` (the integration tests reuse it with knot DNS and the real relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.dns import Resolver
from gateway.tls.mta_sts import (
    MAX_AGE_LIMIT,
    MtaSts,
    MtaStsError,
    mx_matches,
    parse_policy,
    parse_txt,
)
from tests.harness import TestCA
from tests.unit.fakedns import FakeZone, start_fake_dns

ENFORCE = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.mx.example.com\r\n"
ENFORCE += "max_age: 86400\r\n"


# --- a local HTTPS policy server ------------------------------------------------------------


class PolicyServer:
    """Serves ``/.well-known/mta-sts.txt`` over HTTPS on ``address`` (port chosen by the OS).

    ``body``/``status``/``headers`` say what to answer (``bodies[host]`` per Host header, for a
    certificate naming several ``mta-sts.<domain>``); ``delay`` stalls the answer (timeout
    tests); ``requests`` counts the fetches.  Runs in a thread, stopped by :meth:`close`.
    """

    def __init__(self, context: ssl.SSLContext, address: str = "127.0.0.1") -> None:
        self.body = ENFORCE
        self.bodies: dict[str, str] = {}
        self.statuses: dict[str, int] = {}  # per Host header, else ``status``
        self.hosts_asked: list[str] = []
        self.status = 200
        self.headers: dict[str, str] = {"Content-Type": "text/plain"}
        self.delay = 0.0
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                host = self.headers.get("Host", "")
                outer.hosts_asked.append(host)
                if outer.delay:
                    time.sleep(outer.delay)
                text = outer.bodies.get(host, outer.body)
                body = text.encode() if self.path == "/.well-known/mta-sts.txt" else b""
                self.send_response(outer.statuses.get(host, outer.status) if body else 404)
                for key, value in outer.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.address = address
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


# --- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("mx1.example.com", "mx1.example.com", True),
        ("mx1.example.com", "MX1.Example.COM.", True),
        ("mx1.example.com", "mx2.example.com", False),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "a.b.example.com", False),  # exactly one label
        ("*.example.com", "example.com", False),
        ("*.example.com", "mx1.example.com.evil.net", False),
        ("*.example.com", ".example.com", False),
        ("", "mx1.example.com", False),
    ],
)
def test_mx_matches(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def test_parse_txt() -> None:
    assert parse_txt(["v=STSv1; id=20240101T000000"]) == "20240101T000000"
    assert parse_txt(["google-site-verification=x", "v=STSv1;id=abc;"]) == "abc"
    for bad in ([], ["v=STSv2; id=a"], ["v=STSv1; id=a", "v=STSv1; id=b"], ["v=STSv1;"]):
        with pytest.raises(MtaStsError):
            parse_txt(bad)
    with pytest.raises(MtaStsError, match="valid id"):
        parse_txt(["v=STSv1; id=has-dash"])


def test_parse_policy_enforce_crlf_and_lf() -> None:
    policy = parse_policy("example.com", "id1", ENFORCE)
    assert (policy.mode, policy.mx, policy.max_age) == (
        "enforce",
        ("mx1.example.com", "*.mx.example.com"),
        86400,
    )
    assert policy.allows_mx("a.mx.example.com") and not policy.allows_mx("mx2.example.com")
    assert parse_policy("example.com", "id1", ENFORCE.replace("\r\n", "\n")).mx == policy.mx


def test_parse_policy_caps_max_age_and_ignores_unknown_keys() -> None:
    text = "version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 99999999\nfoo: bar\n"
    policy = parse_policy("example.com", "id1", text)
    assert policy.max_age == MAX_AGE_LIMIT and policy.mode == "testing"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "at least one mx"),
        ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: soon\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.b\n", "max_age"),
        ("<html>hello</html>\n", "':'"),
    ],
)
def test_parse_policy_rejects(text: str, why: str) -> None:
    with pytest.raises(MtaStsError, match=why):
        parse_policy("example.com", "id1", text)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("example.com", "x", "version: STSv1\nmode: none\nmax_age: 60\n").mx == ()


# --- discovery, fetch and cache -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def https(ca: TestCA) -> Iterator[PolicyServer]:
    server = PolicyServer(ca.valid("mta-sts.example.com").server_context())
    yield server
    server.close()


@pytest.fixture
async def zone_and_resolver() -> AsyncIterator[tuple[FakeZone, Resolver]]:
    zone = FakeZone(ttl=0)  # ttl 0: nothing cached, so a test can change the zone
    zone.add("_mta-sts.example.com", "TXT", '"v=STSv1; id=one"')
    zone.add("mta-sts.example.com", "A", "127.0.0.1")
    transport, port = await start_fake_dns(zone)
    config = parse_config(
        {
            "gateway": {"hostname": "gw.example.net", "role": "bad"},
            "dns": {
                "nameservers": [f"127.0.0.1:{port}"],
                "timeout": "300ms",
                "extra_public_networks": ["127.0.0.1/32"],  # the policy server; .77 is not
            },
        }
    )
    yield zone, Resolver(config.dns)
    transport.close()


def make_sts(
    resolver: Resolver, ca: TestCA, port: int, clock: Clock, timeout: str = "2s"
) -> MtaSts:
    config = parse_config(
        {
            "gateway": {"hostname": "gw.example.net", "role": "bad"},
            "mta_sts": {
                "https_port": port,
                "ca_bundle": str(ca.ca_bundle),
                "fetch_timeout": timeout,
            },
        }
    )
    return MtaSts(config.mta_sts, resolver, clock=clock)


async def test_fetch_parse_and_cache_by_id(zone_and_resolver, https, ca) -> None:
    zone, resolver = zone_and_resolver
    clock = Clock()
    sts = make_sts(resolver, ca, https.port, clock)
    policy = await sts.policy("example.com")
    assert policy is not None and policy.mode == "enforce" and policy.policy_id == "one"
    assert await sts.policy("example.com") is policy  # same id: the cache answers
    assert https.requests == 1
    https.body = ENFORCE.replace("mx1.example.com", "mx9.example.com")
    zone.records["_mta-sts.example.com"]["TXT"] = ['"v=STSv1; id=two"']
    changed = await sts.policy("example.com")
    assert changed is not None and changed.policy_id == "two" and "mx9.example.com" in changed.mx
    assert https.requests == 2


async def test_expired_policy_is_fetched_again(zone_and_resolver, https, ca) -> None:
    _, resolver = zone_and_resolver
    clock = Clock()
    sts = make_sts(resolver, ca, https.port, clock)
    assert await sts.policy("example.com") is not None
    clock.now += 86400 + 1
    assert await sts.policy("example.com") is not None
    assert https.requests == 2


async def test_failed_refresh_keeps_the_cached_policy(zone_and_resolver, https, ca) -> None:
    zone, resolver = zone_and_resolver
    clock = Clock()
    sts = make_sts(resolver, ca, https.port, clock)
    first = await sts.policy("example.com")
    zone.records["_mta-sts.example.com"]["TXT"] = ['"v=STSv1; id=two"']
    https.status = 500
    assert await sts.policy("example.com") is first  # RFC 8461 5.1: keep using it
    del zone.records["_mta-sts.example.com"]  # the TXT record vanishes (or is blocked)
    assert await sts.policy("example.com") is first
    clock.now += 86400 + 1  # ... until the cached policy expires
    assert await sts.policy("example.com") is None


async def test_no_txt_record_means_no_policy(zone_and_resolver, https, ca) -> None:
    zone, resolver = zone_and_resolver
    del zone.records["_mta-sts.example.com"]
    assert await make_sts(resolver, ca, https.port, Clock()).policy("example.com") is None
    assert https.requests == 0


async def test_redirect_is_not_followed(zone_and_resolver, https, ca) -> None:
    _, resolver = zone_and_resolver
    https.status = 302
    https.headers["Location"] = "https://mta-sts.example.com/elsewhere"
    sts = make_sts(resolver, ca, https.port, Clock())
    assert await sts.policy("example.com") is None
    assert https.requests == 1
    with pytest.raises(MtaStsError, match="HTTP 302"):
        await sts.fetch("example.com", "one")


async def test_certificate_must_verify(zone_and_resolver, ca) -> None:
    _, resolver = zone_and_resolver
    server = PolicyServer(ca.wrong_name("mta-sts.example.com").server_context())
    try:
        sts = make_sts(resolver, ca, server.port, Clock())
        with pytest.raises(MtaStsError, match="certificate not valid"):
            await sts.fetch("example.com", "one")
        assert await sts.policy("example.com") is None
    finally:
        server.close()


async def test_fetch_is_bounded_in_time_and_size(zone_and_resolver, https, ca) -> None:
    _, resolver = zone_and_resolver
    sts = make_sts(resolver, ca, https.port, Clock(), timeout="500ms")
    https.delay = 2.0
    started = time.monotonic()
    with pytest.raises(MtaStsError, match="timed out"):
        await sts.fetch("example.com", "one")
    assert time.monotonic() - started < 1.5
    https.delay = 0
    https.body = ENFORCE + "x: " + "y" * 70000 + "\n"
    with pytest.raises(MtaStsError, match="larger than"):
        await sts.fetch("example.com", "one")


async def test_concurrent_lookups_share_one_fetch(zone_and_resolver, https, ca) -> None:
    _, resolver = zone_and_resolver
    sts = make_sts(resolver, ca, https.port, Clock())
    policies = await asyncio.gather(*(sts.policy("example.com") for _ in range(5)))
    assert all(p is policies[0] for p in policies) and https.requests == 1


async def test_nothing_listening_is_a_failure_not_a_hang(zone_and_resolver, ca) -> None:
    _, resolver = zone_and_resolver
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sts = make_sts(resolver, ca, port, Clock())
    assert await sts.policy("example.com") is None


async def test_a_failed_fetch_is_not_retried_at_once(zone_and_resolver, https, ca) -> None:
    _, resolver = zone_and_resolver
    clock = Clock()
    sts = make_sts(resolver, ca, https.port, clock)
    https.status = 500
    assert await sts.policy("example.com") is None
    assert await sts.policy("example.com") is None  # no second fetch: deliveries do not stall
    assert https.requests == 1
    https.status = 200
    clock.now += 61
    assert await sts.policy("example.com") is not None
    assert https.requests == 2


async def test_the_cache_is_bounded(zone_and_resolver, https, ca) -> None:
    zone, resolver = zone_and_resolver
    sts = make_sts(resolver, ca, https.port, Clock())
    sts.max_domains = 1
    assert await sts.policy("example.com") is not None
    zone.add("_mta-sts.example.org", "TXT", '"v=STSv1; id=o"')
    zone.add("mta-sts.example.org", "A", "127.0.0.1")
    await sts.policy("example.org")  # the certificate does not name it: nothing cached
    assert sts.cached("example.com") is not None
    sts._remember(sts._cache, "other.example", sts.cached("example.com"))
    assert sts.cached("example.com") is None and sts.cached("other.example") is not None


async def test_workers_share_fetched_policies_through_the_state_file(
    zone_and_resolver, https, ca, tmp_path
) -> None:
    from gateway.tls.mta_sts import StateFile

    _, resolver = zone_and_resolver
    clock = Clock()
    first = make_sts(resolver, ca, https.port, clock)
    first.state = StateFile(tmp_path / "mta-sts.json")
    second = make_sts(resolver, ca, https.port, clock)
    second.state = StateFile(tmp_path / "mta-sts.json")
    policy = await first.policy("example.com")
    assert policy is not None and https.requests == 1
    shared = await second.policy("example.com")  # same id in DNS: no fetch of its own
    assert shared is not None and shared.mx == policy.mx and https.requests == 1
    clock.now += 86400 + 1  # expired for everyone
    assert second.cached("example.com") is None


async def test_a_policy_host_on_an_internal_address_is_not_fetched(zone_and_resolver, ca) -> None:
    """Issue 12: 127.0.0.77 is outside dns.extra_public_networks: never connected to."""
    zone, resolver = zone_and_resolver
    zone.records["mta-sts.example.com"]["A"] = ["127.0.0.77"]
    server = PolicyServer(ca.valid("mta-sts.example.com").server_context(), "127.0.0.77")
    try:
        sts = make_sts(resolver, ca, server.port, Clock())
        assert await sts.policy("example.com") is None
        with pytest.raises(MtaStsError, match="not public"):
            await sts.fetch("example.com", "one")
        assert server.requests == 0
        zone.records["mta-sts.example.com"]["A"] = ["127.0.0.77", "127.0.0.1"]
        https = PolicyServer(ca.valid("mta-sts.example.com").server_context())
        try:  # a public address beside it: that one is used
            policy = await make_sts(resolver, ca, https.port, Clock()).fetch("example.com", "one")
            assert policy.mode == "enforce" and https.requests == 1
        finally:
            https.close()
        assert server.requests == 0
    finally:
        server.close()
