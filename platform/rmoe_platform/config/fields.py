"""Build frozen config dataclasses from plain dicts (YAML) with errors that name the field's path."""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
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
        raise ConfigError(_at(path, str(err), fields)) from None


def _at(path: str, message: str, fields: Mapping[str, Any]) -> str:
    """A check's message under `path`: one that starts with a field's name (`task: unknown task`,
    `batch_size must be …`) is that field's (`experiment.downstream.task: unknown task`)."""
    head = re.match(r"\w*", message).group()  # type: ignore[union-attr]
    return f"{path}.{message}" if head in fields else f"{path}: {message}"


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for option in options:
            if dataclasses.is_dataclass(option):
                return from_dict(option, value, path)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)  # type: ignore[arg-type]
    return coerce(hint, value, path)


def coerce(hint: Any, value: Any, path: str) -> Any:
    """`value` as the type `hint` (pydantic's lax mode: a number's text becomes the number, a list a
    tuple), or a ConfigError naming the field, the expected type and the value. Booleans stay apart
    from numbers: `true` is not an integer, `1` is not a flag."""
    if hint is Any:
        return value
    if (hint is bool) != isinstance(value, bool) and (hint is bool or _accepts_number(hint)):
        raise ConfigError(f"{path}: expected {type_name(hint)}, got {value!r} ({type(value).__name__})")
    try:
        return _adapter(hint).validate_python(value)
    except pydantic.ValidationError as err:
        raise ConfigError(f"{path}: expected {type_name(hint)}, got {value!r}{_where(err)}") from None


@functools.cache
def _adapter(hint: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(hint)


def _where(err: pydantic.ValidationError) -> str:
    """Which element of a list or mapping was wrong, when the value is one of those."""
    for error in err.errors():
        items = [str(part) for part in error["loc"] if isinstance(part, int) or not _looks_like_type(part)]
        if items:
            return f" (item {'.'.join(items)}: {error['msg'][0].lower()}{error['msg'][1:]})"
    return ""


def _looks_like_type(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "dict", "list"})


def _accepts_number(hint: Any) -> bool:
    """Whether `hint` (or one of a union's options) is an int or float field."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts_number(option) for option in typing.get_args(hint))
    return hint in (int, float)


def type_name(hint: Any) -> str:
    """A type as a config author reads it: `int`, `list of float`, `str or list of int`, `one of 'a', 'b'`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(type_name(a) for a in args)})"
        return f"a list of {type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "a mapping"
    return getattr(hint, "__name__", str(hint))


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
