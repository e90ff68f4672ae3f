"""lab/run/state.json: what `up` built, for tests, the inventory and `status`."""

from __future__ import annotations

import json
from typing import Any

from lab.config import STATE_FILE

FORMAT_VERSION = 1


def write(state: dict[str, Any]) -> None:
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": FORMAT_VERSION, **state}, indent=2) + "\n")
    tmp.rename(STATE_FILE)


def read() -> dict[str, Any] | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None
