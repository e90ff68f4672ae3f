"""Shared fixtures: real daemons from tests/harness, started once per session or per test.

A daemon whose binary is missing makes its tests skip with the reason, except in CI
(env CI=true), where a missing binary is a failure: CI must run everything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from tests.harness import (
    Clamd,
    KnotDNS,
    PostfixFarEnd,
    Rspamd,
    SmtpSink,
    StartTLSStripProxy,
    TestCA,
)
from tests.harness.util import Daemon

D = TypeVar("D", bound=Daemon)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_binaries(*names: str) -> None:
    """Skip (locally) or fail (in CI) when one of the binaries is not installed."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    reason = f"not installed: {', '.join(missing)} (run scripts/setup.sh)"
    if in_ci():
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def require_root() -> None:
    """Skip (locally) or fail (in CI) when not running as root."""
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail("CI=true but the tests do not run as root")
    pytest.skip("needs root")


def running(daemon: D) -> Iterator[D]:
    """Start `daemon`, yield it, and always close it (also when start() failed)."""
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()


@pytest.fixture(scope="session")
def test_ca() -> Iterator[TestCA]:
    """A CA with `valid()`, `wrong_name()`, `expired()` leaves and `ca_bundle`."""
    ca = TestCA()
    yield ca
    ca.close()


@pytest.fixture(scope="session")
def clamd() -> Iterator[Clamd]:
    """clamd on the EICAR test database (tests/data/clamav), unix socket + TCP."""
    require_binaries("clamd")
    yield from running(Clamd())


@pytest.fixture
def clamd_private() -> Iterator[Clamd]:
    """A clamd of this test's own, for tests that stop/start it (clamd down)."""
    require_binaries("clamd")
    yield from running(Clamd())


@pytest.fixture(scope="session")
def knot_dns() -> Iterator[KnotDNS]:
    """Authoritative knotd for the whole session: only a catch-all root zone (NXDOMAIN for
    everything) at first. Tests add zones with `knot_dns.set_zone(name, text)` - use zone
    names unique to the test, the server is shared."""
    require_binaries("knotd", "knotc")
    yield from running(KnotDNS())


@pytest.fixture(scope="session")
def rspamd(knot_dns: KnotDNS) -> Iterator[Rspamd]:
    """rspamd whose DNS goes to the session's knot_dns; `rspamd.url`, `rspamd.check()`."""
    require_binaries("rspamd")
    yield from running(Rspamd(nameserver=knot_dns.nameserver))


@pytest.fixture
def postfix_far_end(test_ca: TestCA) -> Iterator[Callable[..., PostfixFarEnd]]:
    """Factory: `postfix_far_end("127.0.0.21", tls="valid", hostname="mx.x.test")` starts a
    Postfix far end (ca defaults to the session test_ca); all are stopped after the test."""
    require_binaries("postconf", "swaks")
    require_root()
    started: list[PostfixFarEnd] = []

    def make(address: str = "127.0.0.1", **kwargs: Any) -> PostfixFarEnd:
        kwargs.setdefault("ca", test_ca)
        far_end = PostfixFarEnd(address, **kwargs)
        started.append(far_end)
        far_end.start()
        return far_end

    yield make
    for far_end in started:
        far_end.close()


@pytest.fixture
def smtp_sink() -> Iterator[Callable[..., SmtpSink]]:
    """Factory: `smtp_sink("127.0.0.31", tls_cert=test_ca.valid("sink.test"))` starts an
    aiosmtpd sink recording every message; all are stopped after the test."""
    started: list[SmtpSink] = []

    def make(address: str = "127.0.0.1", **kwargs: Any) -> SmtpSink:
        sink = SmtpSink(address, **kwargs)
        started.append(sink)
        sink.start()
        return sink

    yield make
    for sink in started:
        sink.stop()


@pytest.fixture
def starttls_strip_proxy() -> Iterator[Callable[..., StartTLSStripProxy]]:
    """Factory: `starttls_strip_proxy("127.0.0.32:0", far_end.endpoint)`; stopped after."""
    started: list[StartTLSStripProxy] = []

    def make(listen: str | tuple[str, int], upstream: str | tuple[str, int]) -> StartTLSStripProxy:
        proxy = StartTLSStripProxy(listen, upstream)
        started.append(proxy)
        proxy.start()
        return proxy

    yield make
    for proxy in started:
        proxy.stop()
