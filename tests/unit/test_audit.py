"""The audit trail (issue 15, point 5): every state-changing ``smg queue`` action is one JSON
line in ``<spool>/audit.log`` with the operator (``SUDO_USER`` first) and ``--reason``; an
action that cannot be audited is refused; a reason cannot forge a line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import audit
from gateway.cli import main
from gateway.queue.admin import SpoolAdmin
from gateway.queue.spool import Spool


async def _spool_with_message(tmp_path: Path) -> tuple[Path, str]:
    spool = await Spool.open(tmp_path / "spool")
    try:
        queue_id = await spool.enqueue(
            "a@example.net", ["b@example.org"], b"Subject: x\r\n\r\nbody\r\n",
            client_ip="127.0.0.1", helo="client.example.net",
        )  # fmt: skip
    finally:
        await spool.close()
    config = tmp_path / "smg.toml"
    config.write_text(
        f'[gateway]\nhostname = "gw.example.net"\nrole = "bad"\nspool = "{tmp_path / "spool"}"\n'
    )
    return config, queue_id


def test_operator_prefers_sudo_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "root")
    monkeypatch.setenv("SUDO_USER", "alice")
    assert audit.operator() == "alice"
    monkeypatch.delenv("SUDO_USER")
    assert audit.operator() == "root"


def test_audited_records_ok_and_failure(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SUDO_USER", "bob")
    with audit.audited(tmp_path, "tenant.suspend", "customer-a", "spam run") as extra:
        extra["count"] = 1
    with pytest.raises(RuntimeError), audit.audited(tmp_path, "tenant.resume", "x", None):
        raise RuntimeError("boom")
    first, second = audit.read(tmp_path)
    assert first["user"] == "bob" and first["action"] == "tenant.suspend"
    assert first["target"] == "customer-a" and first["reason"] == "spam run"
    assert first["result"] == "ok" and first["count"] == 1 and first["time"].endswith("Z")
    assert second["result"] == "failed: RuntimeError: boom" and second["reason"] is None
    assert oct((tmp_path / "audit.log").stat().st_mode & 0o777) == "0o640"


async def test_queue_actions_are_audited(tmp_path: Path, monkeypatch, capsys) -> None:
    config, queue_id = await _spool_with_message(tmp_path)
    monkeypatch.setenv("SUDO_USER", "carol")
    evil = 'ticket 42\n{"forged": true}'
    assert main(["queue", "hold", queue_id, "--reason", evil, "--config", str(config)]) == 0
    assert main(["queue", "release", queue_id, "--config", str(config)]) == 0
    assert main(["queue", "release", queue_id, "--config", str(config)]) == 1  # not held
    assert main(["queue", "flush", "--reason", "r", "--config", str(config)]) == 0
    assert main(["queue", "delete", "NOSUCHID", "--config", str(config)]) == 1
    assert main(["queue", "delete", queue_id, "--reason", "dup", "--config", str(config)]) == 0
    assert main(["queue", "list", "--config", str(config)]) == 0  # reads are not audited
    lines = (tmp_path / "spool" / "audit.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["action"], r["result"][:6]) for r in records] == [
        ("queue.hold", "ok"),
        ("queue.release", "ok"),
        ("queue.release", "refuse"),
        ("queue.flush", "ok"),
        ("queue.delete", "failed"),
        ("queue.delete", "ok"),
    ]
    assert all(r["user"] == "carol" for r in records)
    assert records[0]["target"] == queue_id
    assert records[0]["reason"] == 'ticket 42\\n{"forged": true}'
    assert records[3]["target"] == "*"


async def test_unauditable_action_is_refused(tmp_path: Path, capsys) -> None:
    config, queue_id = await _spool_with_message(tmp_path)
    (tmp_path / "spool" / "audit.log").mkdir()  # unwritable even for root
    assert main(["queue", "hold", queue_id, "--config", str(config)]) == 1
    assert "cannot write the audit log" in capsys.readouterr().err
    with SpoolAdmin(tmp_path / "spool") as admin:
        assert admin.show(queue_id).state != "held"
