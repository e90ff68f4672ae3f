"""The spool: durable enqueue with group commit, queue ids, due selection, conditional attempt
results, operator actions from a second connection, and SpoolUnavailable on a full database."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.queue import owners, store
from gateway.queue import writer as spool_writer
from gateway.queue.admin import SpoolAdmin
from gateway.queue.errors import is_full
from gateway.queue.model import AttemptResult, NewMessage, RecipientUpdate
from gateway.queue.owners import new_queue_id
from gateway.queue.spool import (
    Spool,
    SpoolFull,
    SpoolUnavailable,
    UnknownMessage,
)

MESSAGE = b"From: a@example.net\r\nSubject: test\r\n\r\nhello\r\n"


@pytest.fixture
async def spool(tmp_path: Path):
    handle = await Spool.open(tmp_path / "spool")
    yield handle
    await handle.close()


def test_queue_ids_are_short_unique_and_sorted() -> None:
    ids = [new_queue_id() for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert ids == sorted(ids)
    assert all(len(i) == 13 and i.isalnum() and i.isupper() for i in ids)


async def test_enqueue_is_durable_and_group_committed(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool")
    ids = await asyncio.gather(
        *(spool.enqueue(f"s{i}@example.net", ["r@example.org"], MESSAGE) for i in range(300))
    )
    stats = spool.stats
    await spool.close()
    assert len(set(ids)) == 300
    # Concurrent enqueues share commits: far fewer fsyncs than messages.
    assert stats["operations"] == 300 and stats["commits"] < 100
    # A fresh process (here: a fresh connection) sees every acknowledged message.
    with SpoolAdmin(tmp_path / "spool") as admin:
        listed = admin.list()
        assert {m.id for m in listed} == set(ids)
        assert admin.show(ids[0]).data == MESSAGE
    conn = sqlite3.connect(tmp_path / "spool" / "queue.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_enqueue_keeps_envelope_and_facts(spool: Spool) -> None:
    facts = {"spam": {"score": 12.5, "symbols": ["GTUBE"]}, "tags": {"x"}}
    queue_id = await spool.enqueue(
        "a@example.net",
        ["b@example.org", "c@example.org"],
        MESSAGE,
        route="bad_gateway",
        client_ip="127.0.0.5",
        helo="client.example.net",
        facts=facts,
    )
    message = await spool.load(queue_id)
    assert message is not None
    assert message.sender == "a@example.net"
    assert [r.address for r in message.recipients] == ["b@example.org", "c@example.org"]
    assert message.route == "bad_gateway" and message.state == "active"
    assert message.client_ip == "127.0.0.5" and message.helo == "client.example.net"
    assert message.facts["spam"]["score"] == 12.5 and message.facts["tags"] == ["x"]
    assert message.kind == "mail" and message.attempts == 0


async def test_invalid_input_is_refused_alone(spool: Spool) -> None:
    with pytest.raises(ValueError):
        await spool.enqueue("a@example.net", [], MESSAGE)
    with pytest.raises(ValueError):
        await spool.enqueue("a@example.net", ["b@example.org"], MESSAGE, route="elsewhere")
    # The writer is still fine.
    assert await spool.enqueue("a@example.net", ["b@example.org"], MESSAGE)


async def test_listener_gets_active_messages_only(spool: Spool) -> None:
    seen = []
    spool.add_listener(lambda message: seen.append((message.id, message.data)))
    active = await spool.enqueue("a@example.net", ["b@example.org"], MESSAGE)
    await spool.enqueue("a@example.net", ["b@example.org"], MESSAGE, state="held")
    assert seen == [(active, MESSAGE)]


async def test_due_selection(spool: Spool) -> None:
    now = time.time()
    active = await spool.enqueue("a@example.net", ["b@example.org"], MESSAGE)
    held = await spool.enqueue("a@example.net", ["b@example.org"], MESSAGE, state="held")
    later = await spool.enqueue("a@example.net", ["b@example.org"], MESSAGE)
    tls = await spool.enqueue("a@example.net", ["b@example.org"], MESSAGE)
    await spool.finish_attempt(AttemptResult(later, [], "deferred", now + 3600))
    await spool.finish_attempt(AttemptResult(tls, [], "held", now - 1, hold_reason="tls"))
    due = await spool.due(100)
    assert active in due and tls in due
    assert held not in due and later not in due
    assert later in await spool.due(100, now=now + 7200)


async def test_finish_attempt_records_recipients_and_queues_the_ndr(spool: Spool) -> None:
    queue_id = await spool.enqueue("a@example.net", ["b@x.org", "c@x.org", "d@x.org"], MESSAGE)
    ndr = NewMessage("", ["a@example.net"], b"Subject: ndr\r\n\r\nx\r\n", kind="ndr")
    result = AttemptResult(
        queue_id,
        [
            RecipientUpdate(0, "delivered", "250 ok", "mx.x.org"),
            RecipientUpdate(1, "bounced", "550 5.1.1 unknown", "mx.x.org"),
            RecipientUpdate(2, "pending", "451 4.3.0 later", "mx.x.org"),
        ],
        "deferred",
        time.time() + 60,
        ndr=ndr,
    )
    outcome = await spool.finish_attempt(result)
    assert outcome.state == "deferred" and outcome.ndr_id
    message = await spool.load(queue_id)
    assert [r.status for r in message.recipients] == ["delivered", "bounced", "pending"]
    assert message.recipients[2].last_reply == "451 4.3.0 later"
    assert message.attempts == 1 and message.state == "deferred"
    bounce = await spool.load(outcome.ndr_id)
    assert bounce.kind == "ndr" and bounce.sender == "" and bounce.state == "active"
    # The last pending recipient delivered: the message leaves the queue.
    done = await spool.finish_attempt(
        AttemptResult(queue_id, [RecipientUpdate(2, "delivered", "250 ok")])
    )
    assert done.state == "removed"
    assert await spool.load(queue_id) is None


async def test_operator_hold_and_delete_win_over_an_attempt(spool: Spool) -> None:
    held = await spool.enqueue("a@example.net", ["b@x.org"], MESSAGE)
    deleted = await spool.enqueue("a@example.net", ["b@x.org"], MESSAGE)
    # An operator acts from another process while the attempts are under way.
    with SpoolAdmin(spool.path) as admin:
        admin.hold(held)
        admin.delete(deleted)
    pending = [RecipientUpdate(0, "pending", "451 later")]
    outcome = await spool.finish_attempt(AttemptResult(held, pending, "deferred", 0))
    assert outcome.state == "held"
    message = await spool.load(held)
    assert message.state == "held" and message.hold_reason == "operator"
    assert (await spool.finish_attempt(AttemptResult(deleted, pending))).state == "gone"
    # An attempt that is due is not started on a held message.
    assert not await spool.begin_attempt(held)


async def test_admin_release_flush_and_unknown_ids(spool: Spool) -> None:
    queue_id = await spool.enqueue("a@example.net", ["b@x.org"], MESSAGE)
    await spool.finish_attempt(
        AttemptResult(queue_id, [RecipientUpdate(0, "pending", "451")], "deferred", 2e9)
    )
    with SpoolAdmin(spool.path) as admin:
        assert queue_id not in await spool.due(10)
        assert admin.flush() == 1
        assert queue_id in await spool.due(10)
        admin.hold(queue_id)
        assert queue_id not in await spool.due(10)
        assert admin.release(queue_id) == 1
        assert admin.release(queue_id) == 0  # not held any more
        assert queue_id in await spool.due(10)
        with pytest.raises(UnknownMessage):
            admin.hold("NOSUCHID")
        with pytest.raises(UnknownMessage):
            admin.show("NOSUCHID")
        assert admin.counts()["deferred"] == 1


async def test_active_messages_are_due_after_a_restart(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool")
    queue_id = await spool.enqueue("a@example.net", ["b@x.org"], MESSAGE)
    await spool.close()
    again = await Spool.open(tmp_path / "spool")
    try:
        assert await again.due(10) == [queue_id]
        assert await again.begin_attempt(queue_id)
    finally:
        await again.close()


async def test_full_database_gives_spool_unavailable_and_recovers(spool: Spool) -> None:
    # Cap the writer connection's database size: the next big insert fails like a full disk.
    pages = await spool.submit(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await spool.submit(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 2}"))
    with pytest.raises(SpoolUnavailable, match="full"):
        await spool.enqueue("a@example.net", ["b@x.org"], b"x" * 200_000)
    # The failed batch is not on disk, and the writer works again on a fresh connection.
    assert (await spool.counts())["active"] == 0
    assert await spool.enqueue("a@example.net", ["b@x.org"], MESSAGE)


async def test_a_full_database_is_told_apart(spool: Spool) -> None:
    """SpoolFull (the intake's 452 4.3.1) for SQLITE_FULL; other failures stay plain."""
    pages = await spool.submit(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await spool.submit(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 2}"))
    with pytest.raises(SpoolFull):
        await spool.enqueue("a@example.net", ["b@x.org"], b"x" * 200_000)
    assert is_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_full(sqlite3.OperationalError("attempt to write a readonly database"))


async def test_a_batch_that_fails_fails_for_everyone_in_it(spool: Spool, monkeypatch) -> None:
    def broken_insert(conn, message, now):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "insert_message", broken_insert)
    results = await asyncio.gather(
        *(spool.enqueue("a@example.net", ["b@x.org"], MESSAGE) for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(r, SpoolUnavailable) for r in results)


async def test_unwritable_spool_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolUnavailable):
        await Spool.open(blocker / "spool")


def test_admin_on_a_missing_spool(tmp_path: Path) -> None:
    with pytest.raises(SpoolUnavailable, match="no spool database"):
        SpoolAdmin(tmp_path / "nothing")


async def test_active_mail_of_a_live_process_is_left_alone(spool: Spool) -> None:
    queue_id = await spool.enqueue("a@example.net", ["b@x.org"], MESSAGE)
    live = f"{owners._boot_id()}:1:{owners._start_time(1)}"  # PID 1 is always there
    dead = f"{owners._boot_id()}:1:0"  # PID 1, but not the one that started at 0

    async def set_owner(owner: str) -> None:
        await spool.submit(
            lambda c: c.execute("UPDATE messages SET owner = ? WHERE id = ?", (owner, queue_id))
        )

    await set_owner(live)
    assert owners.owner_alive(live) and not owners.owner_alive(dead)
    assert queue_id not in await spool.due(10)
    assert not await spool.begin_attempt(queue_id)  # another live relay process delivers it
    await set_owner(dead)
    assert queue_id in await spool.due(10)
    assert await spool.begin_attempt(queue_id)
    message = await spool.load(queue_id)
    assert message.state == "active"
    owner = await spool.submit(
        lambda c: c.execute("SELECT owner FROM messages WHERE id = ?", (queue_id,)).fetchone()[0]
    )
    assert owner == owners.process_owner()


async def test_a_version_1_spool_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(
        store._SCHEMA.replace(",\n    tenant       TEXT", "")
        .replace(",\n    destination  TEXT NOT NULL DEFAULT ''", "")
        .replace(",\n    owner        TEXT", "")
        .replace("CREATE INDEX IF NOT EXISTS messages_owner ON messages (state, owner);", "")
        .replace(
            "CREATE INDEX IF NOT EXISTS messages_destination"
            " ON messages (destination, state, next_attempt);",
            "",
        )
        + "PRAGMA user_version = 1;"
    )
    conn.execute(
        "INSERT INTO messages (id, sender, data, size, route, state, created_at, next_attempt)"
        " VALUES ('OLD', 'a@x.org', x'00', 1, 'direct', 'active', 0, 0)"
    )
    conn.execute("INSERT INTO recipients (message_id, position, address) VALUES ('OLD', 0, 'b')")
    conn.commit()
    conn.close()
    spool = await Spool.open(db)
    try:
        assert await spool.due(10) == ["OLD"]
        assert await spool.begin_attempt("OLD")
    finally:
        await spool.close()


async def test_a_complete_attempt_removes_the_message_unless_deleted(spool: Spool) -> None:
    done = await spool.enqueue("a@example.net", ["b@x.org"], MESSAGE)
    deleted = await spool.enqueue("a@example.net", ["b@x.org"], MESSAGE)
    ndr = NewMessage("", ["a@example.net"], b"Subject: ndr\r\n\r\nx\r\n", kind="ndr")
    final = [RecipientUpdate(0, "bounced", "550 no")]
    outcome = await spool.finish_attempt(AttemptResult(done, final, ndr=ndr, complete=True))
    assert outcome.state == "removed" and outcome.ndr_id
    assert await spool.load(done) is None and await spool.load(outcome.ndr_id) is not None
    with SpoolAdmin(spool.path) as admin:
        admin.delete(deleted)
    gone = await spool.finish_attempt(AttemptResult(deleted, final, ndr=ndr, complete=True))
    assert gone.state == "gone" and gone.ndr_id is None  # deleted by the operator: no NDR


def test_several_processes_open_a_new_spool_at_once(tmp_path: Path) -> None:
    """gateway.workers start together: none may fail on the new database's WAL switch."""
    import subprocess
    import sys

    script = (
        "import asyncio, sys\n"
        "from gateway.queue.spool import Spool\n"
        "async def main():\n"
        "    spool = await Spool.open(sys.argv[1])\n"
        "    await spool.enqueue('a@x.org', ['b@y.org'], b'x')\n"
        "    await spool.close()\n"
        "asyncio.run(main())\n"
    )
    for attempt in range(4):
        path = tmp_path / f"spool{attempt}"
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(path)], stderr=subprocess.PIPE)
            for _ in range(4)
        ]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, errors
        with SpoolAdmin(path) as admin:
            assert len(admin.list()) == 4


def test_commit_delay_only_while_several_callers_are_busy(tmp_path: Path) -> None:
    writer = spool_writer.Writer(tmp_path / "queue.sqlite", 1.0)  # not started: the gate alone
    assert not writer._busy()  # idle
    writer._last_commit, writer._last_batch = time.monotonic(), 1
    assert not writer._busy()  # a lone client: one operation per commit, commit at once
    writer._last_batch = 3
    assert writer._busy()  # several callers just now: wait for more
    writer._last_commit = time.monotonic() - 2 * spool_writer.BUSY_GAP
    assert not writer._busy()  # quiet again
    writer._last_commit, writer.commit_delay = time.monotonic(), 0
    assert not writer._busy()  # switched off


def test_commit_gathering_stops_at_the_target_or_the_delay(tmp_path: Path) -> None:
    writer = spool_writer.Writer(tmp_path / "queue.sqlite", 1.0)  # not started: the gathering alone
    for n in range(spool_writer.COMMIT_TARGET + 2):
        writer.jobs.put(n)
    batch: list = ["first"]
    started = time.monotonic()
    assert writer._gather(batch) is False
    assert len(batch) == spool_writer.COMMIT_TARGET and time.monotonic() - started < 0.5
    assert writer._drain(batch) is False and len(batch) == spool_writer.COMMIT_TARGET + 3
    writer.commit_delay = 0.02
    started = time.monotonic()
    assert writer._gather(["lonely"]) is False  # nothing comes: waits the delay, not more
    assert 0.015 <= time.monotonic() - started < 1.0
    writer.jobs.put(spool_writer.STOP)
    assert writer._gather(["first"]) is True
