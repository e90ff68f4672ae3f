"""The relay's memory under large messages (issue 12, point 2): a real ``smg serve`` (scanners
off, as bench/relay runs it), its peak RSS (VmHWM of the process tree) read from /proc.

Marked ``memory``: scripts/test.sh runs them after the fast suite (``pytest -m memory``); they
need about 1.3 GB of disk under /var/tmp for the spool.  The figures are in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import KnotDNS
from tests.integration.smg_relay import SmgRelay, base_config

pytestmark = pytest.mark.memory

MIB = 1 << 20
ZONE = "memory.test"
ZONE_TEXT = """
sender      MX 10 mail.sender
mail.sender A 127.0.0.30
far         MX 10 mx.far
mx.far      A 127.0.0.31
"""
LINE = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"


@pytest.fixture(autouse=True)
def _only_when_asked(request: pytest.FixtureRequest) -> None:
    if "memory" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a memory test: run with -m memory (scripts/test.sh does)")


@pytest.fixture(scope="module")
def zone(knot_dns: KnotDNS) -> KnotDNS:
    knot_dns.set_zone(ZONE, ZONE_TEXT)
    return knot_dns


@pytest.fixture
def spool_dir(zone: KnotDNS) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="smg-memory-", dir="/var/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def message(size: int) -> bytes:
    head = b"From: a@sender.memory.test\r\nTo: b@far.memory.test\r\nSubject: big\r\n\r\n"
    return head + LINE * ((size - len(head)) // len(LINE))


def tree_kib(pid: int, field: str) -> int:
    """``field`` (VmHWM, VmRSS) summed over ``pid`` and its children, in KiB."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += tree_kib(int(child), field)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            total += int(line.split()[1])
    return total


async def send(port: int, data: bytes, chunk: int = 256 * 1024) -> str:
    """One SMTP transaction with ``SIZE=``, the message written in chunks: the final reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> str:
        while True:
            line = await reader.readline()
            if len(line) < 4 or line[3:4] != b"-":
                return line.decode().strip()

    try:
        await reply()
        for command in ("EHLO c.example.net", f"MAIL FROM:<a@sender.memory.test> SIZE={len(data)}",
                        "RCPT TO:<b@far.memory.test>", "DATA"):  # fmt: skip
            writer.write(command.encode() + b"\r\n")
            await reply()
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            writer.write(view[start : start + chunk])
            await writer.drain()
        writer.write(b".\r\n")
        return await asyncio.wait_for(reply(), 300)
    finally:
        writer.close()


def start_relay(spool_dir: Path, nameserver: str, **gateway: object) -> SmgRelay:
    config = base_config(spool_dir, nameserver, **gateway)  # nothing listens at mx.far: deferred
    config["delivery"]["retry_initial"] = "1h"
    relay = SmgRelay(spool_dir, config)
    relay.start()
    return relay


def measure(
    spool_dir: Path, nameserver: str, count: int, size: int, **gateway: object
) -> tuple[int, int, list[str]]:
    """(VmRSS before, VmHWM after in KiB, the replies) for ``count`` concurrent messages."""
    relay = start_relay(spool_dir, nameserver, **gateway)
    try:
        assert relay.proc is not None
        before = tree_kib(relay.proc.pid, "VmRSS")
        data = message(size)

        async def all_of_them() -> list[str]:
            port = relay.host_port[1]
            return list(await asyncio.gather(*(send(port, data) for _ in range(count))))

        replies = asyncio.run(all_of_them())
        peak = tree_kib(relay.proc.pid, "VmHWM")
    finally:
        relay.stop()
    return before, peak, replies


def test_one_18mib_message(spool_dir: Path, zone: KnotDNS) -> None:
    before, peak, replies = measure(spool_dir, zone.nameserver, 1, 18 * MIB)
    print(f"\none 18 MiB message: VmRSS {before // 1024} MiB before, VmHWM {peak // 1024} MiB")
    assert replies[0].startswith("250"), replies
    assert peak - before < 4 * 18 * 1024  # KiB: 4 copies at most (57 MiB; 94 MiB before)


def test_fifty_concurrent_25mib_messages(spool_dir: Path, zone: KnotDNS) -> None:
    budget = 256 * MIB
    size = 25 * MIB - 4096
    before, peak, replies = measure(spool_dir, zone.nameserver, 50, size, data_memory="256MiB")
    print(f"\n50 x 25 MiB: VmRSS {before // 1024} MiB before, VmHWM {peak // 1024} MiB")
    assert all(r.startswith("250") for r in replies), replies
    assert peak < before + 3 * budget // 1024  # KiB
