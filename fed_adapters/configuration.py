"""TOML configuration files read into typed dataclasses, with errors that name the key at fault.

Runs are configured by data, not code: a TOML file maps onto nested dataclasses; an unknown key, a
value of the wrong type or a missing required key is reported with its dotted path (`train.lr`) and
what would be valid. `--set key=value` overrides use the same paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


def load_toml(path: str | Path, cls: type[T], overrides: list[str] | None = None) -> T:
    """Reads `path` into `cls`, after applying `key=value` overrides (values parsed as TOML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    for override in overrides or []:
        apply_override(data, override, cls)
    try:
        return from_mapping(cls, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def apply_override(data: dict[str, Any], override: str, cls: type | None = None) -> None:
    """Sets `a.b.c=value` in nested `data`; the value is parsed as TOML, else taken as a string.

    A key that `cls` types as a string takes the text as written: `run_name=2024` or `adapter.layers=1`
    mean the string, not a number that would then fail the type check.
    """
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like key=value, e.g. train.lr=0.001")
    parts = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if cls is not None and _field_type(cls, parts) is str and not isinstance(value, str):
        value = raw.strip()
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a table")
    node[parts[-1]] = value


def _field_type(cls: type, parts: list[str]) -> Any:
    """The type hint of the field at `parts` under dataclass `cls` (None where the path leads nowhere)."""
    hint: Any = cls
    for part in parts:
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
    """Builds dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown key {_join(where, key)!r}{hint}; valid keys here: {', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], _join(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {_join(where, name)!r}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or 'config'}: {error}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {_kind(value)}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {_kind(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where} must be {hint.__name__}, got {_kind(value)}")
    return value


def to_toml(data: dict[str, Any]) -> str:
    """Writes nested dicts as TOML (enough for resolved configs: scalars, lists, tables, arrays of tables)."""
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if v is not None and not _is_table(v) and not _is_table_list(v)}
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in table.items():
        if _is_table(value):
            lines += ["", f"[{'.'.join(path + [key])}]"]
            _emit_table(value, path + [key], lines)
        elif _is_table_list(value):
            for item in value:
                lines += ["", f"[[{'.'.join(path + [key])}]]"]
                _emit_table(item, path + [key], lines)


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
