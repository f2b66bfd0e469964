"""Build frozen config dataclasses from plain dicts (YAML) with errors that name the field's path."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the field (e.g. `stage.optim.lr`)."""


def from_dict(cls: type[T], data: Any, path: str) -> T:
    """`cls(**data)` recursively, rejecting unknown keys and prefixing every error with `path`."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{path}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for option in options:
            if dataclasses.is_dataclass(option):
                return from_dict(option, value, path)
        return _convert(options[0], value, path) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)  # type: ignore[arg-type]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        return _float_text(value)
    return value


def _float_text(value: str) -> float | str:
    """A number YAML 1.1 reads as text (`1e-3`, `4.0e14`: an exponent without a sign) as the float it
    spells; any other text stays as it is, for the field's own check to refuse."""
    try:
        return float(value)
    except ValueError:
        return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; malformed YAML is a ConfigError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return data


def check(condition: bool, message: str) -> None:
    """Raise a ValueError (turned into a path-prefixed ConfigError by `from_dict`) unless `condition`."""
    if not condition:
        raise ValueError(message)


def set_path(data: dict[str, Any], path: str, value: Any, where: str) -> None:
    """Set the dotted `path` (`a.b.c`) in a nested mapping, creating mappings on the way; `where`
    prefixes the error when a step of the path is not a mapping."""
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, null …)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {override!r}: value is not valid YAML: {err}") from None
    set_path(data, key.strip(), value, f"--set {override!r}")
