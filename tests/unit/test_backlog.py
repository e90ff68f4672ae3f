"""The spool with a big backlog: the destination column and its upgrade, the query plans of the
due scan, the listing and the flush (indexes, never a scan of the table), a due scan whose cost
does not grow with a paused destination's backlog, paged listing, and the start check of a big
spool left to the background."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.cli import main as smg
from gateway.queue import backlog, store
from gateway.queue import spool as spool_module
from gateway.queue.admin import SpoolAdmin
from gateway.queue.owners import process_owner
from gateway.queue.spool import Spool, SpoolDamaged

# The spool schema as version 2 wrote it (before the destination column), frozen here so the
# upgrade test keeps testing the same old file when the schema grows.
SCHEMA_V2 = """
CREATE TABLE messages (
    id TEXT PRIMARY KEY, sender TEXT NOT NULL, data BLOB NOT NULL, size INTEGER NOT NULL,
    route TEXT NOT NULL, state TEXT NOT NULL, hold_reason TEXT,
    kind TEXT NOT NULL DEFAULT 'mail', created_at REAL NOT NULL, next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_attempt REAL, client_ip TEXT, helo TEXT,
    facts TEXT NOT NULL DEFAULT '{}', owner TEXT
);
CREATE INDEX messages_due ON messages (state, next_attempt);
CREATE INDEX messages_owner ON messages (state, owner);
CREATE TABLE recipients (
    message_id TEXT NOT NULL, position INTEGER NOT NULL, address TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', last_reply TEXT, remote_mta TEXT, updated_at REAL,
    PRIMARY KEY (message_id, position)
);
PRAGMA user_version = 2;
"""


def fill(db: Path, destination: str, count: int, due: float, start: int = 0) -> None:
    """``count`` deferred messages to ``destination`` straight into the database (fast)."""
    conn = sqlite3.connect(db)
    rows = [(f"{destination[:3].upper()}{start + i:010d}", destination) for i in range(count)]
    conn.executemany(
        "INSERT INTO messages (id, sender, data, size, route, state, created_at, next_attempt,"
        " destination) VALUES (?, 'a@example.net', x'00', 1, 'direct', 'deferred', 0, ?, ?)",
        [(qid, due, dest) for qid, dest in rows],
    )
    conn.executemany(
        "INSERT INTO recipients (message_id, position, address) VALUES (?, 0, ?)",
        [(qid, f"user@{dest}") for qid, dest in rows],
    )
    conn.commit()
    conn.close()


@pytest.fixture
async def spool(tmp_path: Path):
    handle = await Spool.open(tmp_path / "queue.sqlite")
    yield handle
    await handle.close()


def plan(conn: sqlite3.Connection, sql: str, args: tuple) -> list[str]:
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)]


def no_table_scan(details: list[str]) -> None:
    """Every step is an index search (a scan of the recursive CTE's own rows is fine)."""
    scans = [d for d in details if d.startswith("SCAN")
             and d not in ("SCAN d", "SCAN o", "SCAN CONSTANT ROW")]  # fmt: skip
    assert not scans, details
    assert any("INDEX" in d or "PRIMARY KEY" in d for d in details), details


async def test_query_plans_use_the_indexes(spool: Spool) -> None:
    fill(spool.path, "dead.example", 2000, 0.0)
    conn = store.connect(spool.path)
    conn.execute("ANALYZE")  # the plans must hold with statistics too
    now = time.time()
    claim = (process_owner(),)
    due_sql = backlog.DUE_SQL.format(marks="?")
    due_plan = plan(conn, due_sql, ("d", *claim, "d", now, "d", now, "tls", 10))
    no_table_scan(due_plan)
    assert all("messages_destination" in d for d in due_plan if d.startswith("SEARCH"))
    no_table_scan(plan(conn, backlog._DESTINATIONS, ("a", 10)))
    no_table_scan(plan(conn, "SELECT MIN(destination) FROM messages", ()))
    page_sql = "SELECT id FROM messages WHERE id > ? AND destination = ? ORDER BY id LIMIT ?"
    no_table_scan(plan(conn, page_sql, ("", "dead.example", 100)))
    no_table_scan(plan(conn, "SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT ?", ("", 9)))
    flush_sql = (
        "UPDATE messages INDEXED BY messages_destination SET next_attempt = ?"
        " WHERE destination = ? AND state = 'deferred' AND next_attempt > ?"
    )
    no_table_scan(plan(conn, flush_sql, (now, "dead.example", now)))
    conn.close()


async def test_due_scan_cost_does_not_grow_with_a_paused_backlog(tmp_path: Path) -> None:
    """SQLite's virtual-machine steps for one scan, with 200 and with 20,000 due messages for a
    paused destination: the same within a small margin (index seeks, not a walk)."""
    steps: dict[int, int] = {}
    for backlog_size in (200, 20_000):
        db = tmp_path / f"{backlog_size}.sqlite"
        spool = await Spool.open(db)
        fill(db, "dead.example", backlog_size, 0.0)
        fill(db, "live.example", 20, 0.0)
        conn = store.connect(db)
        counter = [0]

        def tick(counter: list[int] = counter) -> int:
            counter[0] += 1
            return 0

        conn.set_progress_handler(tick, 100)
        found = spool._scan(conn, time.time(), 50, lambda d: 0 if d == "dead.example" else 50)
        assert len(found) == 20 and all(d.queue_id.startswith("LIV") for d in found)
        steps[backlog_size] = counter[0]
        conn.close()
        await spool.close()
    assert steps[20_000] <= steps[200] * 1.5 + 5, steps


async def test_due_scan_goes_round_robin_over_destinations(spool: Spool) -> None:
    for name in ("a.example", "b.example", "c.example"):
        fill(spool.path, name, 10, 0.0)
    first = await spool.due(6, room=2)
    assert sorted({i[:3] for i in first}) == ["A.E", "B.E", "C.E"]
    assert await spool.due(10, rooms={"b.example": 0}, room=3) and all(
        not i.startswith("B.E") for i in await spool.due(10, rooms={"b.example": 0}, room=3)
    )
    # A small limit moves on: the next scan starts after the last destination served.
    assert (await spool.due(1, room=1))[0][:3] != (await spool.due(1, room=1))[0][:3]


async def test_version_2_spool_gets_destinations(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA_V2)
    conn.execute(
        "INSERT INTO messages (id, sender, data, size, route, state, created_at, next_attempt)"
        " VALUES ('OLD', 'a@x.org', x'00', 1, 'direct', 'deferred', 0, 0)"
    )
    conn.execute(
        "INSERT INTO recipients (message_id, position, address) VALUES"
        " ('OLD', 1, 'c@other.example'), ('OLD', 0, 'b@Mixed.Example')"
    )
    conn.commit()
    conn.close()
    spool = await Spool.open(db)
    try:
        assert await spool.due(10) == ["OLD"]
    finally:
        await spool.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT destination FROM messages").fetchone()[0] == "mixed.example"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(messages)")}
    assert {"messages_due", "messages_destination"} <= indexes
    conn.close()


async def test_new_messages_record_their_destination(spool: Spool) -> None:
    queue_id = await spool.enqueue("a@example.net", ["X@Big.Example", "y@other.example"], b"x")
    message = await spool.load(queue_id)
    assert message is not None and message.destination == "big.example"
    with SpoolAdmin(spool.path) as admin:
        assert [m.id for m in admin.pages(destination="big.example")] == [queue_id]
        assert list(admin.pages(destination="other.example")) == []


async def test_paged_listing_and_flush_by_destination(spool: Spool, tmp_path: Path, capsys) -> None:
    future = time.time() + 3600
    fill(spool.path, "dead.example", 2500, future)
    fill(spool.path, "live.example", 5, future)
    with SpoolAdmin(spool.path) as admin:
        ids = [m.id for m in admin.pages()]
        assert len(ids) == 2505 and ids == sorted(ids)
        after = [m.id for m in admin.pages(after=ids[1000], limit=3)]
        assert after == ids[1001:1004]
        assert admin.flush_destination("LIVE.example") == 5
    config = tmp_path / "smg.toml"
    config.write_text(
        f'[gateway]\nhostname = "gw.example.net"\nrole = "bad"\nspool = "{spool.path.parent}"\n'
    )
    assert smg(["queue", "list", "--config", str(config), "--json", "--limit", "2",
                "--destination", "dead.example"]) == 0  # fmt: skip
    listed = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in listed] == ids[:2]
    assert smg(["queue", "flush", "--config", str(config), "--destination", "dead.example"]) == 0
    assert "2500 deferred message(s) to dead.example due now" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        smg(["queue", "list", "--config", str(config), "--limit", "0"])


async def test_a_big_spool_is_checked_after_start(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "queue.sqlite"
    (await Spool.open(db)).check_later or None
    fill(db, "x.example", 10, 0.0)
    monkeypatch.setattr(spool_module, "BACKGROUND_CHECK_SIZE", 0)
    spool = await Spool.open(db, check=True)
    try:
        assert spool.check_later
        await spool.check()  # sound
    finally:
        await spool.close()
    monkeypatch.setattr(spool_module, "BACKGROUND_CHECK_SIZE", 1 << 40)
    small = await Spool.open(db, check=True)
    assert not small.check_later
    await small.close()


async def test_the_background_check_finds_damage(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "queue.sqlite"
    spool = await Spool.open(db)
    await spool.close()
    fill(db, "x.example", 3000, 0.0)
    with open(db, "r+b") as f:  # scribble over a b-tree page in the middle
        f.seek(20 * 4096)
        f.write(b"\xff" * 4096)
    monkeypatch.setattr(spool_module, "BACKGROUND_CHECK_SIZE", 0)
    spool = await Spool.open(db, check=True)
    try:
        with pytest.raises(SpoolDamaged):
            await spool.check()
    finally:
        await spool.close()


# The spool schema as version 3 wrote it (before the tenant column), frozen like SCHEMA_V2.
SCHEMA_V3 = SCHEMA_V2.replace(
    "facts TEXT NOT NULL DEFAULT '{}', owner TEXT\n",
    "facts TEXT NOT NULL DEFAULT '{}', owner TEXT, destination TEXT NOT NULL DEFAULT ''\n",
).replace("PRAGMA user_version = 2;", "PRAGMA user_version = 3;")


@pytest.mark.parametrize("schema", [SCHEMA_V2, SCHEMA_V3])
async def test_older_spools_get_the_tenant_column(tmp_path: Path, schema: str) -> None:
    db = tmp_path / "queue.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(schema)
    conn.execute(
        "INSERT INTO messages (id, sender, data, size, route, state, created_at, next_attempt)"
        " VALUES ('OLD', 'a@x.org', x'00', 1, 'direct', 'deferred', 0, 0)"
    )
    conn.execute("INSERT INTO recipients (message_id, position, address) VALUES ('OLD', 0, 'b@y')")
    conn.commit()
    conn.close()
    spool = await Spool.open(db)
    try:
        old = await spool.load("OLD")
        assert old is not None and old.tenant is None and old.destination == "y"
        new_id = await spool.enqueue("a@a.example", ["b@y"], b"x", tenant="customer-a")
        new = await spool.load(new_id)
        assert new is not None and new.tenant == "customer-a"
    finally:
        await spool.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION == 4
    assert conn.execute("SELECT tenant FROM messages WHERE id = 'OLD'").fetchone()[0] is None
    conn.close()
