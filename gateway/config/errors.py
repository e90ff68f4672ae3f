"""What goes wrong in a configuration file, and how it is reported."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigProblem:
    key: str
    message: str


def render_warning(source: str, warning: ConfigProblem) -> str:
    """``FILE: KEY: warning: WHAT``, one line, like an error's."""
    return f"{source}: {warning.key}: warning: {warning.message}"


class ConfigError(Exception):
    """A configuration file is invalid; ``problems`` lists every error found."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(
            f"{self.source}: {p.key}: {p.message}" if p.key else f"{self.source}: {p.message}"
            for p in self.problems
        )


class InvalidValue(ValueError):
    """Raised by a value parser; the message says what is wrong with the value.

    The loader turns it into a :class:`ConfigProblem` for the key being read.
    """
