"""Shared fixtures: real daemons from tests/harness, started once per session or per test.

A daemon whose binary is missing makes its tests skip with the reason, except in CI
(env CI=true), where a missing binary is a failure: CI must run everything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.harness import Clamd, KnotDNS, Rspamd, TestCA


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


@pytest.fixture(scope="session")
def test_ca() -> TestCA:
    """A CA with `valid()`, `wrong_name()`, `expired()` leaves and `ca_bundle`."""
    return TestCA()


@pytest.fixture(scope="session")
def clamd() -> Iterator[Clamd]:
    """clamd on the EICAR test database (tests/data/clamav), unix socket + TCP."""
    require_binaries("clamd")
    daemon = Clamd()
    daemon.start()
    yield daemon
    daemon.close()


@pytest.fixture
def clamd_private() -> Iterator[Clamd]:
    """A clamd of this test's own, for tests that stop/start it (clamd down)."""
    require_binaries("clamd")
    daemon = Clamd()
    daemon.start()
    yield daemon
    daemon.close()


@pytest.fixture(scope="session")
def knot_dns() -> Iterator[KnotDNS]:
    """Authoritative knotd for the whole session: only a catch-all root zone (NXDOMAIN for
    everything) at first. Tests add zones with `knot_dns.set_zone(name, text)` - use zone
    names unique to the test, the server is shared."""
    require_binaries("knotd", "knotc")
    daemon = KnotDNS()
    daemon.start()
    yield daemon
    daemon.close()


@pytest.fixture(scope="session")
def rspamd(knot_dns: KnotDNS) -> Iterator[Rspamd]:
    """rspamd whose DNS goes to the session's knot_dns; `rspamd.url`, `rspamd.check()`."""
    require_binaries("rspamd")
    daemon = Rspamd(nameserver=knot_dns.nameserver)
    daemon.start()
    yield daemon
    daemon.close()
