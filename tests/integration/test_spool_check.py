"""The relay's integrity check of the spool at start (issue 12, point 7): ``smg serve`` on a
spool whose pages were damaged refuses to start, naming the file, what SQLite said and the
runbook, and exits 1; a sound spool starts as before."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from gateway.queue.spool import Spool, SpoolDamaged
from tests.integration.smg_relay import SMG, base_config, to_toml

pytestmark = pytest.mark.integration

MESSAGE = b"From: a@example.net\r\nSubject: test\r\n\r\n" + b"hello world\r\n" * 40


async def _fill(spool_dir: Path, count: int) -> Path:
    spool = await Spool.open(spool_dir)
    await asyncio.gather(
        *(spool.enqueue(f"s{i}@example.net", ["r@example.org"], MESSAGE) for i in range(count))
    )
    await spool.close()
    return spool_dir / "queue.sqlite"


def _damage(db: Path) -> None:
    """Garbage over pages in the middle of the file (page headers included)."""
    size = db.stat().st_size
    with open(db, "r+b") as handle:
        handle.seek(size // 2 - (size // 2) % 4096)
        handle.write(b"\xa5garbage\x00" * 1600)


async def test_open_with_check_refuses_a_damaged_spool(tmp_path: Path) -> None:
    db = await _fill(tmp_path / "spool", 400)
    _damage(db)
    with pytest.raises(SpoolDamaged) as caught:
        await Spool.open(tmp_path / "spool", check=True)
    said = str(caught.value)
    assert str(db) in said and "SQLite says:" in said and "docs/queue.md" in said


def test_serve_exits_1_on_a_damaged_spool(tmp_path: Path) -> None:
    db = asyncio.run(_fill(tmp_path / "spool", 400))
    _damage(db)
    config = tmp_path / "smg.toml"
    config.write_text(to_toml(base_config(tmp_path, "127.0.0.1:9")))
    run = subprocess.run(
        [*SMG, "serve", "--config", str(config)], capture_output=True, timeout=30, check=False
    )
    output = (run.stdout + run.stderr).decode(errors="replace")
    assert run.returncode == 1, output
    assert f"spool database {db} is damaged" in output, output
    assert "SQLite says:" in output and "docs/queue.md" in output, output


async def test_a_sound_spool_passes_the_check(tmp_path: Path) -> None:
    await _fill(tmp_path / "spool", 50)
    spool = await Spool.open(tmp_path / "spool", check=True)
    try:
        assert len(await spool.list()) == 50
    finally:
        await spool.close()
