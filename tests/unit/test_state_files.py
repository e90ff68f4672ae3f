"""Issue 12, point 7: every state file the relay writes (TLS failure memory, MTA-STS cache,
both through ``StateFile``) is fsynced before its rename and its directory after, so a power
cut leaves the old table or the new one, never an empty or partial file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.tls.failures import TlsFailureCache
from gateway.tls.mta_sts import StateFile


class Fsyncs:
    """Each os.fsync: what the descriptor names, and whether ``final`` existed then."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.calls: list[tuple[str, bool]] = []


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Fsyncs:
    record = Fsyncs(tmp_path / "state.json")
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        record.calls.append((os.readlink(f"/proc/self/fd/{fd}"), record.final.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return record


def _check(fsyncs: Fsyncs) -> None:
    calls, path = fsyncs.calls, fsyncs.final
    temporaries = [i for i, (name, _) in enumerate(calls) if name.endswith(".tmp")]
    directories = [i for i, (name, exists) in enumerate(calls)
                   if name == str(path.parent) and exists]  # fmt: skip
    assert temporaries, f"the temporary file was not fsynced: {calls}"
    assert directories, f"the directory was not fsynced after the rename: {calls}"
    assert temporaries[0] < directories[-1]


def test_state_file_update_fsyncs_file_and_directory(fsyncs: Fsyncs) -> None:
    path = fsyncs.final
    assert StateFile(path).update(lambda table: table.update({"example.net": {"mode": "x"}}))
    _check(fsyncs)
    assert path.read_text() == '{"example.net": {"mode": "x"}}'


def test_tls_failure_memory_is_fsynced(fsyncs: Fsyncs) -> None:
    TlsFailureCache(ttl=60, state=StateFile(fsyncs.final)).record_failure(
        "partner.net", "STARTTLS not offered", "encrypt"
    )
    _check(fsyncs)
