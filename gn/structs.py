"""Typed values from YAML: dataclasses built from mappings with keys and types checked.

Shared by the run config (`gn.config`) and the methods' typed hyperparameters
(`gn.methods`), so both reject unknown keys and wrongly typed values the same way,
naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from gn.errors import ConfigError, require, suggest


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    """Instantiate frozen dataclass `cls` from a mapping, checking keys and types."""
    if dataclasses.is_dataclass(raw):
        return raw
    require(isinstance(raw, Mapping), f"'{where}' must be a mapping, got {type(raw).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(raw, fields, where)
    hints = typing.get_type_hints(cls)
    kwargs = {k: coerce(hints[k], v, f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to type `tp` (int, float, str, bool, tuples,
    optionals and nested dataclasses), or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"'{where}' has an invalid value {value!r}.")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin is tuple:
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            value = [value]
        elem = args[0] if args else Any
        return tuple(coerce(elem, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        require(isinstance(value, bool), f"'{where}' must be true or false, got {value!r}.")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok and isinstance(value, float) and value.is_integer():
            value, ok = int(value), True
        require(ok, f"'{where}' must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool),
                f"'{where}' must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        require(isinstance(value, str), f"'{where}' must be a string, got {value!r}.")
        return value
    return value


def check_keys(raw: Mapping, valid: Any, where: str) -> None:
    valid = list(valid)
    for key in raw:
        if key not in valid:
            full = f"{where}.{key}" if where else str(key)
            raise ConfigError(
                f"Unknown config key '{full}'.{suggest(str(key), valid)} Valid keys"
                f"{' in ' + repr(where) if where else ''}: {', '.join(valid)}."
            )


def plain(obj: Any) -> Any:
    """Convert tuples/dataclasses to YAML-friendly lists/dicts."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if dataclasses.is_dataclass(obj):
        return plain(dataclasses.asdict(obj))
    return obj
