"""The relay's configuration: one TOML file, one typed schema, validated at load.

Every error names the file, the key and what is wrong, and all errors are reported at once so
that an operator fixes a file in one pass.  The same schema validates the deploy's inventories:
``roles/`` render this file from inventory data and load it through :func:`load_config` before
any host is touched.

Each section is a frozen dataclass (:mod:`gateway.config.schema`).  A field's type says how its
TOML value is parsed (see ``_PARSERS``); ``field(metadata={"parse": ...})`` overrides that for
values with units (sizes, durations) or structure (addresses, networks).  Once every key parsed,
the checks across keys (:mod:`gateway.config.checks`) run.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config.checks import CROSS_CHECKS
from gateway.config.errors import ConfigError, ConfigProblem, InvalidValue
from gateway.config.schema import Config

_PARSERS: dict[Any, Callable[[Any], Any]] = {
    str: lambda v: v if isinstance(v, str) else _fail(f"expected a string, got {v!r}"),
    int: lambda v: (
        v
        if isinstance(v, int) and not isinstance(v, bool)
        else _fail(f"expected a whole number, got {v!r}")
    ),
    float: lambda v: (
        float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool)
        else _fail(f"expected a number, got {v!r}")
    ),
    bool: lambda v: v if isinstance(v, bool) else _fail(f"expected true or false, got {v!r}"),
    Path: lambda v: Path(v) if isinstance(v, str) and v else _fail(f"expected a path, got {v!r}"),
}


def _fail(message: str) -> Any:
    raise InvalidValue(message)


class _Loader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[ConfigProblem] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(key, message))

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, dict):
            self.problem(prefix, f"expected a table, got {data!r}")
            return None
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        for key in data:
            if key not in known:
                self.problem(f"{prefix}.{key}".lstrip("."), "unknown key")
        values: dict[str, Any] = {}
        for name, spec in known.items():
            key = f"{prefix}.{name}".lstrip(".")
            if name not in data and dataclasses.is_dataclass(hints[name]):
                data = {**data, name: {}}  # a missing section: validate its required keys
            if name not in data:
                default = self._default(spec, key)
                if default is not dataclasses.MISSING:
                    values[name] = default
                continue
            values[name] = self._value(spec, hints[name], data[name], key)
        try:
            return cls(**values)
        except TypeError:
            return None  # a required key was missing and already reported

    def _default(self, spec: dataclasses.Field, key: str) -> Any:
        if spec.default is not dataclasses.MISSING:
            return spec.default
        if spec.default_factory is not dataclasses.MISSING:
            return spec.default_factory()
        self.problem(key, "required key is missing")
        return dataclasses.MISSING

    def _value(self, spec: dataclasses.Field, hint: Any, raw: Any, key: str) -> Any:
        try:
            if "parse" in spec.metadata:
                return spec.metadata["parse"](raw)
            return self._by_type(hint, raw, key)
        except InvalidValue as exc:
            self.problem(key, str(exc))
            return None

    def _by_type(self, hint: Any, raw: Any, key: str) -> Any:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            return self._by_type(inner[0], raw, key)
        if origin is list:
            (item_type,) = typing.get_args(hint)
            if not isinstance(raw, list):
                raise InvalidValue(f"expected a list, got {raw!r}")
            if dataclasses.is_dataclass(item_type):
                return [self.build(item_type, item, f"{key}[{i}]") for i, item in enumerate(raw)]
            return [self._by_type(item_type, item, f"{key}[{i}]") for i, item in enumerate(raw)]
        if dataclasses.is_dataclass(hint):
            return self.build(hint, raw, key)
        return _PARSERS[hint](raw)


def parse_config(data: dict[str, Any], source: str = "<memory>") -> Config:
    """Build a :class:`Config` from parsed TOML data, or raise :class:`ConfigError`."""
    loader = _Loader(source)
    config = loader.build(Config, data, "")
    if config is not None and not loader.problems:
        config = dataclasses.replace(config, source=source)
        for check in CROSS_CHECKS:
            for problem in check(config):
                loader.problems.append(problem)
    if loader.problems or config is None:
        raise ConfigError(source, loader.problems or [ConfigProblem("", "invalid")])
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate one TOML file; raise :class:`ConfigError` naming file and key."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [ConfigProblem("", f"cannot read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigProblem("", f"not valid TOML: {exc}")]) from None
    return parse_config(data, source)
