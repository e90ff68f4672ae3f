"""Finding and removing the mounts the lab made (overlays, tmpfs), deepest first."""

from __future__ import annotations

import logging
from pathlib import Path

from lab.proc import run

log = logging.getLogger("lab")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mount_points() -> list[Path]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        points.append(Path(_unescape(line.split()[4])))
    return points


def is_mount_point(path: Path) -> bool:
    return path.resolve() in mount_points()


def unmount_under(top: Path) -> None:
    """Unmount everything at or below top, deepest first (lazily if busy)."""
    top = top.resolve() if top.exists() else top
    below = [p for p in mount_points() if p == top or top in p.parents]
    for point in sorted(set(below), key=lambda p: len(p.parts), reverse=True):
        log.debug("umount %s", point)
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "-l", point], check=False)
