"""The unpause requests of ``smg queue flush`` (gateway/queue/unpause.py): the relay acts on
each request once, only on those newer than itself, and the file stays short."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.queue.unpause import FILE_NAME, MAX_LINES, UnpauseRequests, request_unpause


def test_each_request_is_taken_once(tmp_path: Path) -> None:
    relay = UnpauseRequests(tmp_path, since=time.time() - 1)
    assert relay.new() == []  # no file yet
    request_unpause(tmp_path, "Partner.Example")
    request_unpause(tmp_path, None)
    assert relay.new() == ["partner.example", None]
    assert relay.new() == []
    request_unpause(tmp_path, "other.example")
    assert relay.new() == ["other.example"]


def test_requests_older_than_the_relay_are_ignored(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text(f"{time.time() - 60:.6f} old.example\ngarbage line\n\n")
    relay = UnpauseRequests(tmp_path)
    assert relay.new() == []
    request_unpause(tmp_path, "new.example")
    assert relay.new() == ["new.example"]


def test_the_file_stays_short(tmp_path: Path) -> None:
    relay = UnpauseRequests(tmp_path, since=0)
    for i in range(MAX_LINES + 5):
        request_unpause(tmp_path, f"d{i}.example")
    lines = (tmp_path / FILE_NAME).read_text().splitlines()
    assert len(lines) <= MAX_LINES
    assert lines[-1].endswith(f"d{MAX_LINES + 4}.example")
    assert relay.new()[-1] == f"d{MAX_LINES + 4}.example"


def test_a_destination_with_spaces_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a destination"):
        request_unpause(tmp_path, "a b.example")
