"""Bundled operations: many files in one operation, checked with one remote command.

pyinfra's ``files.put`` asks the host twice per file (stat, then SHA-1); with some sixty files
per host that is most of a no-change re-run.  ``ensure`` asks once for all the paths it is
given (type, owner, group, mode, SHA-1, link target) and hands only the paths that differ to
pyinfra's own ``files.put`` / ``files.directory`` / ``files.link`` / ``files.file``, so what it
does on a change is exactly what those operations do.  ``system_user`` does the same for the
service user, which pyinfra's ``server.user`` looks up through a fact of every user.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase, operation
from pyinfra.operations import files

# --- what should be on the host -------------------------------------------------------------


@dataclass(frozen=True)
class File:
    """A file with this content (``text``) or the content of a local file (``src``)."""

    dest: str
    text: str | None = None
    src: str | Path | None = None
    user: str = "root"
    group: str = "root"
    mode: str = "644"

    def sha1(self) -> str:
        data = self.text.encode() if self.text is not None else Path(str(self.src)).read_bytes()
        return hashlib.sha1(data).hexdigest()

    def matches(self, state: tuple[str, ...]) -> bool:
        return state[0] == "F" and state[1:] == (
            self.user,
            self.group,
            _mode(self.mode),
            self.sha1(),
        )

    def apply(self) -> Any:
        source = StringIO(self.text) if self.text is not None else str(self.src)
        return files.put._inner(
            src=source, dest=self.dest, user=self.user, group=self.group, mode=self.mode
        )


@dataclass(frozen=True)
class Directory:
    dest: str
    user: str = "root"
    group: str = "root"
    mode: str = "755"

    def matches(self, state: tuple[str, ...]) -> bool:
        return state[0] == "D" and state[1:] == (self.user, self.group, _mode(self.mode))

    def apply(self) -> Any:
        return files.directory._inner(
            path=self.dest, user=self.user, group=self.group, mode=self.mode
        )


@dataclass(frozen=True)
class Link:
    dest: str
    target: str

    def matches(self, state: tuple[str, ...]) -> bool:
        return state == ("L", self.target)

    def apply(self) -> Any:
        return files.link._inner(path=self.dest, target=self.target)


@dataclass(frozen=True)
class Absent:
    dest: str

    def matches(self, state: tuple[str, ...]) -> bool:
        return state == ("-",)

    def apply(self) -> Any:
        return files.file._inner(path=self.dest, present=False)


Wanted = File | Directory | Link | Absent


def _mode(mode: str) -> str:
    """As ``stat -c %a`` prints it: "0644" and "644" are both "644"."""
    return format(int(mode, 8), "o")


# --- one look at many paths -----------------------------------------------------------------


class PathStates(FactBase):
    """path -> ("F", user, group, mode, sha1) | ("D", user, group, mode) | ("L", target)
    | ("-",) for every path asked about: one ``find`` and one ``sha1sum`` for all of them."""

    @staticmethod
    def default() -> dict[str, tuple[str, ...]]:
        return {}

    def command(self, paths: tuple[str, ...]) -> str:
        quoted = " ".join(shlex.quote(p) for p in paths)
        return (
            f"find {quoted} -maxdepth 0 -printf '%p\\t%y\\t%u\\t%g\\t%m\\t%l\\n' 2>/dev/null; "
            f"sha1sum -- {quoted} 2>/dev/null; true"
        )

    def process(self, output: list[str]) -> dict[str, tuple[str, ...]]:
        found: dict[str, list[str]] = {}
        sums: dict[str, str] = {}
        for line in output:
            if "\t" in line:
                path, kind, user, group, mode, target = line.split("\t")
                found[path] = [kind, user, group, mode, target]
            elif len(line) > 42 and line[40:42] == "  ":
                sums[line[42:]] = line[:40]
        states: dict[str, tuple[str, ...]] = {}
        for path, (kind, user, group, mode, target) in found.items():
            if kind == "f":
                states[path] = ("F", user, group, mode, sums.get(path, ""))
            elif kind == "d":
                states[path] = ("D", user, group, mode)
            elif kind == "l":
                states[path] = ("L", target)
            else:
                states[path] = ("?", kind)
        return states


@operation()
def ensure(items: list[Wanted]):  # type: ignore[no-untyped-def]
    """Each item as wanted; a path that is already so costs nothing beyond the one look."""
    states = host.get_fact(PathStates, paths=tuple(item.dest for item in items))
    for item in items:
        if item.matches(states.get(item.dest, ("-",))):
            continue
        yield from item.apply()


# --- the service user -----------------------------------------------------------------------


class Account(FactBase):
    """``getent passwd NAME`` and ``getent group NAME``: (passwd fields or None, group exists)."""

    def command(self, account: str) -> str:
        quoted = shlex.quote(account)
        return (
            f"getent passwd {quoted} || echo -; "
            f"getent group {quoted} >/dev/null && echo group || echo -"
        )

    def process(self, output: list[str]) -> tuple[list[str] | None, bool]:
        passwd = output[0].split(":") if output and output[0] != "-" else None
        return passwd, len(output) > 1 and output[1] == "group"


@operation()
def system_user(account: str, home: str, shell: str = "/usr/sbin/nologin"):  # type: ignore[no-untyped-def]
    """A system user with its own group, no login, no home directory created."""
    name = account
    passwd, has_group = host.get_fact(Account, account=name)
    if not has_group:
        yield f"groupadd --system {shlex.quote(name)}"
    if passwd is None:
        yield (
            f"useradd --system --gid {shlex.quote(name)} --home-dir {shlex.quote(home)} "
            f"--no-create-home --shell {shlex.quote(shell)} {shlex.quote(name)}"
        )
    elif passwd[5:7] != [home, shell]:
        yield f"usermod --home {shlex.quote(home)} --shell {shlex.quote(shell)} {shlex.quote(name)}"
