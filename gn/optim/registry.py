"""One registry of training methods by name.

Every method — first-order optax optimizers, the FOG family, Gauss-Newton — is
registered here with a one-line description, its typed shared hyperparameters
(a frozen dataclass), its method-specific options with defaults, and a builder.
Configs, `gn train --method NAME` and `gn compare` all go through it, so a sweep
swaps AdamW for GN by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from gn.errors import ConfigError, require, suggest

Builder = Callable[[str, dict, Any], Any]   # (display name, hparams, MethodContext) -> Method


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method."""

    name: str
    description: str
    hparams_cls: type               # frozen dataclass of typed shared hyperparameters
    options: Mapping[str, Any]      # method-specific options and their defaults
    defaults: Mapping[str, Any]     # overrides of hparams_cls defaults for this method
    build: Builder
    family: str = "first_order"


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    # Registration lives next to each family; import them once on first use.
    if not _REGISTRY:
        from gn.optim import builtin  # noqa: F401


def names() -> list[str]:
    """Sorted names of all registered methods."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get(name: str) -> MethodSpec:
    """The spec of a registered method, or ConfigError listing valid names."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown method '{name}'.{suggest(name, _REGISTRY)} "
                          f"Registered methods: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


ENTRY_KEYS = ("name", "method", "batch_size")


def resolve_entry(raw: Mapping[str, Any], where: str = "method") -> Any:
    """Validate one `methods:` entry and fill every default.

    `name` is the display name; `method` (default: name) the registered method;
    `batch_size` optionally overrides train.batch_size for this method; every
    other key is a hyperparameter of that method.
    """
    from gn.config import MethodEntry, build_dataclass, coerce

    require(isinstance(raw, Mapping) and "name" in raw,
            f"'{where}' must be a mapping with at least a 'name' key, got {raw!r}.")
    name = raw["name"]
    require(isinstance(name, str) and name, f"'{where}.name' must be a non-empty string.")
    spec = get(raw.get("method", name))
    batch_size = raw.get("batch_size")
    if batch_size is not None:
        batch_size = coerce(int, batch_size, f"{where}.batch_size")
        require(batch_size > 0, f"'{where}.batch_size' must be positive, got {batch_size}.")
    where = f"methods.{name}"
    common_fields = [f.name for f in dataclasses.fields(spec.hparams_cls)]
    given = {k: v for k, v in raw.items() if k not in ENTRY_KEYS}
    valid = common_fields + list(spec.options)
    for key in given:
        if key not in valid:
            raise ConfigError(f"Unknown hyperparameter '{key}' for method '{spec.name}' in {where}."
                              f"{suggest(key, valid)} Valid keys: {', '.join(ENTRY_KEYS + tuple(valid))}.")
    common_raw = {**spec.defaults, **{k: v for k, v in given.items() if k in common_fields}}
    common = build_dataclass(spec.hparams_cls, common_raw, where)
    common.validate(where)
    options = {}
    for key, default in spec.options.items():
        value = given.get(key, default)
        if default is not None and value is not None:
            value = coerce(type(default), value, f"{where}.{key}")
        options[key] = value
    hparams = {**dataclasses.asdict(common), **options}
    return MethodEntry(name=name, method=spec.name, batch_size=batch_size, hparams=hparams)


def build(entry: Any, ctx: Any) -> Any:
    """Build the Method for a resolved MethodEntry."""
    spec = get(entry.method)
    return spec.build(entry.name, dict(entry.hparams), ctx)


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered method."""
    _ensure_loaded()
    return [(n, _REGISTRY[n].description) for n in sorted(_REGISTRY)]
