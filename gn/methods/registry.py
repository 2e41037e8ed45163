"""One registry of training methods by name.

Every method — first-order optax optimizers, the FOG family, Gauss-Newton — is
a `MethodConfig` subclass: a frozen dataclass of its typed hyperparameters with
a one-line description, `validate` and `build(ctx, name) -> Method`. A run
config's `methods:` entries resolve to `MethodEntry`s holding that object, so a
sweep swaps AdamW for GN by name. The registry knows nothing of the run config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from gn.errors import ConfigError, require, suggest
from gn.methods import fog, gn_config
from gn.methods.base import Method, MethodConfig, MethodContext
from gn.methods.optimizers import OPTIMIZERS
from gn.structs import build_dataclass, coerce, plain

_REGISTRY: dict[str, type[MethodConfig]] = {
    **OPTIMIZERS, **{c.name: c for c in (*fog.CONFIGS, *gn_config.CONFIGS)}}


def names() -> list[str]:
    """Sorted names of all registered methods."""
    return sorted(_REGISTRY)


def get(name: str) -> type[MethodConfig]:
    """The typed hyperparameter class of a registered method, or ConfigError listing valid names."""
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown method '{name}'.{suggest(name, _REGISTRY)} "
                          f"Registered methods: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Add a method (a MethodConfig subclass with a unique `name`); usable as a class decorator."""
    require(bool(cls.name), f"{cls.__name__} has no `name`.")
    if cls.name in _REGISTRY:
        raise ValueError(f"method '{cls.name}' is already registered")
    _REGISTRY[cls.name] = cls
    return cls


ENTRY_KEYS = ("name", "method", "batch_size", "target_from")
# Which validation loss a run's targets are read from (train.target_from; an entry may set its own).
TARGET_FROM = ("auto", "ema", "raw", "both")


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One entry of a run's `methods:` list: a display name, the registered method
    it runs, an optional per-method batch size and target reading (train.target_from)
    and its typed hyperparameters."""

    name: str
    method: str
    batch_size: Optional[int] = None
    hparams: MethodConfig = None  # type: ignore[assignment]
    target_from: Optional[str] = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        if self.method != self.name:
            out["method"] = self.method
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        if self.target_from is not None:
            out["target_from"] = self.target_from
        out.update(plain(self.hparams.to_dict()))
        return out

    def build(self, ctx: MethodContext) -> Method:
        """The trainer-facing method."""
        return self.hparams.build(ctx, self.name)


def resolve_entry(raw: Mapping[str, Any], where: str = "method") -> MethodEntry:
    """Validate one `methods:` entry and fill every default.

    `name` is the display name; `method` (default: name) the registered method;
    `batch_size` optionally overrides train.batch_size for this method; every
    other key is a hyperparameter of that method. Unknown keys, wrongly typed
    values, invalid values and keys the chosen variant ignores raise ConfigError
    naming the key.
    """
    require(isinstance(raw, Mapping) and "name" in raw,
            f"'{where}' must be a mapping with at least a 'name' key, got {raw!r}.")
    name = raw["name"]
    require(isinstance(name, str) and bool(name), f"'{where}.name' must be a non-empty string.")
    cls = get(raw.get("method", name))
    batch_size = raw.get("batch_size")
    if batch_size is not None:
        batch_size = coerce(int, batch_size, f"{where}.batch_size")
        require(batch_size > 0, f"'{where}.batch_size' must be positive, got {batch_size}.")
    target_from = raw.get("target_from")
    require(target_from is None or target_from in TARGET_FROM,
            f"'methods.{name}.target_from' must be one of {', '.join(TARGET_FROM)} (or absent: train.target_from), "
            f"got {target_from!r}.")
    where = f"methods.{name}"
    given = {k: v for k, v in raw.items() if k not in ENTRY_KEYS}
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in given:
        if key not in valid:
            raise ConfigError(f"Unknown hyperparameter '{key}' for method '{cls.name}' in {where}."
                              f"{suggest(key, valid)} Valid keys: {', '.join(ENTRY_KEYS + tuple(valid))}.")
    hparams = build_dataclass(cls, given, where)
    hparams.check_given(given, where)
    hparams.validate(where)
    return MethodEntry(name=name, method=cls.name, batch_size=batch_size, hparams=hparams, target_from=target_from)


def build(entry: MethodEntry, ctx: MethodContext) -> Method:
    """Build the Method for a resolved MethodEntry."""
    return entry.build(ctx)


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered method."""
    return [(n, _REGISTRY[n].description) for n in sorted(_REGISTRY)]


def describe_options(name: str) -> str:
    """A method's hyperparameters, one line each: key, type, default and meaning."""
    cls = get(name)
    rows = cls.options()
    kw = max(len(k) for k, *_ in rows)
    tw = max(len(t) for _, t, *_ in rows)
    dw = max(len(repr(d)) for _, _, d, _ in rows)
    lines = [f"{cls.name} ({cls.family}): {cls.description}", ""]
    lines += [f"  {k:<{kw}}  {t:<{tw}}  {d!r:<{dw}}  {doc}" for k, t, d, doc in rows]
    return "\n".join(lines)
