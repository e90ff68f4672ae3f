"""Files that operators' commands create in the spool directory.

``sudo smg queue ...`` and ``sudo smg tenant ...`` run as root, but the files they may create
there (``tenants.sqlite``, ``audit.log``, ``unpause.requests``) are the relay's too: left
root-owned, the relay or the next command run as the relay's user could not write them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def keep_directory_owner(*paths: Path) -> None:
    """Give each existing path the owner of its directory (a no-op unless run as root)."""
    if os.geteuid() != 0:
        return
    for path in paths:
        with contextlib.suppress(OSError):
            owner = path.parent.stat()
            if path.stat().st_uid != owner.st_uid:
                os.chown(path, owner.st_uid, owner.st_gid)
