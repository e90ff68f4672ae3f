"""Files that ``sudo smg ...`` creates in the spool stay the relay's (gateway.files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.audit import record
from gateway.queue.unpause import FILE_NAME, request_unpause

RELAY_UID = 4242  # any user but root: stands for the relay's


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root (CI runs as root)")
def test_root_made_files_get_the_spool_directorys_owner(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, RELAY_UID, RELAY_UID)
    record(spool, "queue.flush", "*", "test")
    request_unpause(spool, None)
    assert (spool / "audit.log").stat().st_uid == RELAY_UID
    assert (spool / FILE_NAME).stat().st_uid == RELAY_UID
