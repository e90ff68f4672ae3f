"""Session deadline, command deadline (a trickling client) and the junk-command limit against
the real ``smg serve``: each cut off with its 421 well before ``idle_timeout``."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_binaries
from tests.harness import KnotDNS
from tests.integration.smg_relay import SmgRelay, base_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def relay(knot_dns: KnotDNS, tmp_path_factory) -> Iterator[SmgRelay]:
    require_binaries("knotd")
    tmp = tmp_path_factory.mktemp("deadlines")
    config = base_config(tmp, knot_dns.nameserver, idle_timeout="300s", command_deadline="2s",
                         session_deadline="5s", max_junk_commands=3)  # fmt: skip
    relay = SmgRelay(tmp, config)
    relay.start()
    yield relay
    relay.stop()


def connect(relay: SmgRelay) -> tuple[socket.socket, object]:
    sock = socket.create_connection(relay.host_port, timeout=15)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220")
    return sock, reader


def test_a_trickling_client_is_cut_off_at_the_command_deadline(relay: SmgRelay) -> None:
    sock, reader = connect(relay)
    started = time.monotonic()
    for byte in b"NOO":  # a byte a second, never a whole line
        sock.sendall(bytes([byte]))
        time.sleep(1)
    line = reader.readline()  # type: ignore[attr-defined]
    assert line.startswith(b"421 4.4.2") and b"Command deadline" in line, line
    assert time.monotonic() - started < 10
    sock.close()


def test_looping_noop_is_cut_off(relay: SmgRelay) -> None:
    sock, reader = connect(relay)
    replies = []
    for _ in range(4):
        sock.sendall(b"NOOP\r\n")
        replies.append(reader.readline())  # type: ignore[attr-defined]
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"421"], replies
    assert b"4.7.0" in replies[-1] and reader.readline() == b""  # type: ignore[attr-defined]
    sock.close()


def test_the_session_deadline_ends_a_busy_session(relay: SmgRelay) -> None:
    sock, reader = connect(relay)
    started = time.monotonic()
    line = b""
    while time.monotonic() - started < 15:
        sock.sendall(b"EHLO client.example\r\n")
        while True:
            line = reader.readline()  # type: ignore[attr-defined]
            if not line or line[3:4] == b" ":
                break
        if not line or line.startswith(b"421"):
            break
        time.sleep(0.5)
    assert line.startswith(b"421 4.4.2") and b"Session deadline" in line, line
    assert 4 < time.monotonic() - started < 10
    sock.close()
