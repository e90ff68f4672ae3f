"""The spool-change signal: every announcement changes the signature, also past the rollover."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.queue import changes
from gateway.queue.changes import ChangeSignal, announce_change


def test_every_announcement_changes_the_signature(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(changes, "MAX_SIZE", 8)
    signal = ChangeSignal(tmp_path)
    seen = [signal.signature()]
    assert seen[0] is None
    for _ in range(30):  # several rollovers to a new file
        announce_change(tmp_path)
        seen.append(signal.signature())
        assert seen[-1] != seen[-2]
    assert (tmp_path / changes.FILE_NAME).stat().st_size <= 8


def test_an_unwritable_directory_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    announce_change(tmp_path / "missing")
    assert "could not announce" in caplog.text
