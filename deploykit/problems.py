"""What is wrong with an inventory: each problem names the file and the entry it is in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """Where a value was written: the file and the entry in it (a host, or a group's data)."""

    file: str
    entry: str


@dataclass(frozen=True)
class Problem:
    file: str
    entry: str
    message: str

    def render(self) -> str:
        return f"{self.file}: {self.entry}: {self.message}"


class InventoryError(Exception):
    """The inventory is broken; ``problems`` lists every mistake, each naming file and entry."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"the inventory has {count} problem{'s' if count != 1 else ''}"
        return head + ":\n" + "\n".join("  " + p.render() for p in self.problems)


class InvalidValue(ValueError):
    """An inventory value that its key's parser refuses; the message says why."""
