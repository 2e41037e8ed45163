"""Checked values of a sweep spec (gn.studies.spec): keys, lists, integers, numbers.

Each raises ConfigError naming the spec key (`where`) and the value it got.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from gn.errors import require, suggest


def _check(raw: Mapping, valid: tuple, where: str) -> None:
    for key in raw:
        require(key in valid, f"Unknown key '{key}' in {where}.{suggest(str(key), valid)} "
                              f"Valid keys: {', '.join(valid)}.")


def _list(value: Any, where: str, *, allow_empty: bool = False) -> list:
    require(value is not None, f"'{where}' is required (a list).")
    require(isinstance(value, (list, tuple)), f"'{where}' must be a list, got {value!r}.")
    require(allow_empty or len(value) > 0, f"'{where}' is an empty grid: give at least one value.")
    return list(value)


def _int(value: Any, where: str, *, minimum: int) -> int:
    require(value is not None, f"'{where}' is required.")
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    require(ok and value >= minimum, f"'{where}' must be an integer >= {minimum}, got {value!r}.")
    return value


def _num(value: Any, where: str, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, str):
        try:
            value = float(value)   # YAML reads 3e-3 (no dot) as a string
        except ValueError:
            pass
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            f"'{where}' must be a number, got {value!r}.")
    if minimum is not None:
        require(value > minimum if strict else value >= minimum,
                f"'{where}' must be {'>' if strict else '>='} {minimum}, got {value}.")
    return float(value)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


__all__ = ["_check", "_list", "_int", "_num", "_round"]
