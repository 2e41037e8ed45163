"""The step interface the trainer runs, and the typed hyperparameters every method has.

A *method* consumes one or more mini-batches per step and returns new
parameters. First-order optimizers are optax transformations run by
`OptaxMethod` (gn.methods.optax_method); the FOG family adds layer statistics
(`StatsMethod`), with the same accumulated step (gn.methods.accumulate); the Gauss-Newton outer step hides many sequential inner
updates and a line search (`GaussNewtonMethod`). All implement `Method`, so a
sweep swaps AdamW for GN by name.

Every registered method has one frozen dataclass of typed hyperparameters (a
`MethodConfig` subclass) with `validate(where)` and `build(ctx, name)`; the run
config stores that object.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Protocol

import jax
import jax.numpy as jnp

from gn.curvature.objective import ApplyFn
from gn.errors import ConfigError, suggest


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How many [micro_batch, T+1] batches a step reads.

    `train` batches count as training tokens; `aux` batches (e.g. line-search
    data) are read from the same stream but reported separately.
    """

    train: int
    micro_batch: int
    aux: int = 0
    aux_micro_batch: int = 0


def _identity(tree: Any) -> Any:
    return tree


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run when it is built."""

    apply_fn: ApplyFn
    total_steps: int
    batch_size: int
    grad_accum: int = 1
    num_devices: int = 1
    model_cfg: Any = None            # gn.model.ModelConfig, for methods that need layer structure
    reference_batch_size: int = 0    # train.batch_size: cost is reported relative to a step at this batch
    # Pins a pytree (params, optimizer state) to the run's parameter shardings inside a jitted step
    # (gn.train.sharding.constrainer); methods apply it to what their steps return.
    constrain: Callable[[Any], Any] = _identity


class Method(Protocol):
    """A training method: a pure, jit-compiled step over several batches."""

    name: str
    plan: BatchPlan
    updates_per_step: int          # sequential parameter updates hidden in one step
    grad_evals_per_step: float     # cost of a step in value_and_grad equivalents

    def init(self, params: Any) -> Any: ...

    def step(self, params: Any, state: Any, batches: jnp.ndarray, aux: jnp.ndarray | None,
             rng: jax.Array) -> tuple[Any, Any, dict]: ...

    def lr(self, step: int) -> float: ...

    def notes(self, step: int, metrics: Mapping[str, float]) -> list[str]: ...

    def summarize(self, rows: list[dict]) -> dict: ...


class MethodBase:
    """Defaults of the optional parts of `Method`: no notes, no summary entries."""

    def notes(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        """One-line remarks the trainer prints for this step (e.g. a line search at its grid's edge)."""
        del step, metrics
        return []

    def summarize(self, rows: list[dict]) -> dict:
        """Method-specific entries for summary.json, from the run's metrics records."""
        del rows
        return {}


def opt(default: Any, doc: str) -> Any:
    """A hyperparameter field with its one-line documentation (shown by `gn methods NAME`)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's typed hyperparameters.

    Subclasses set the class variables below and implement `build`. A key in
    `unused` is accepted by the dataclass (it is shared by the family) but this
    method ignores it, so giving it explicitly is an error.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    unused: ClassVar[tuple[str, ...]] = ()
    # What batch studies and the analysis need to know about a method's steps (gn.studies reads
    # these instead of keeping lists of method names; adding a method is its config class):
    lr_key: ClassVar[str] = "learning_rate"    # the hyperparameter a sweep's lr grid sets
    lr_batch_power: ClassVar[float] = 0.5      # default sweep rule lr0·(B/B0)^p (Adam-like: √B)
    whole_outer_steps: ClassVar[bool] = False  # parameters move only at whole outer steps, so a
                                               # target is crossed at a whole step, never inside one

    def sequential_updates(self, batch_size: int) -> int:
        """Sequential parameter updates one outer step of `batch_size` sequences makes (1 for a
        plain optimizer; the trainer's small-batch control multiplies it by B / its own batch)."""
        del batch_size
        return 1

    def update_batch(self, batch_size: int) -> int:
        """Sequences each of those sequential updates reads."""
        return batch_size

    def validate(self, where: str) -> None:
        """Raise ConfigError naming the key of any invalid value."""

    def unused_keys(self) -> tuple[str, ...]:
        """Fields this configuration ignores (left out of the resolved config)."""
        return self.unused

    def check_given(self, given: Mapping[str, Any], where: str) -> None:
        """Refuse keys the user gave that this configuration would ignore."""
        unused = self.unused_keys()
        for key in given:
            if key in unused:
                raise ConfigError(f"'{where}.{key}' is not used by method '{self.name}'"
                                  f"{self.unused_reason()}; remove it.")

    def unused_reason(self) -> str:
        """Why `unused_keys` are ignored (completes the error message)."""
        return ""

    def to_dict(self) -> dict:
        """The hyperparameters this configuration uses, as plain values."""
        skip = self.unused_keys()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def build(self, ctx: MethodContext, name: str) -> Method:
        raise NotImplementedError

    @classmethod
    def options(cls) -> list[tuple[str, str, Any, str]]:
        """(key, type, default, one-line doc) of every hyperparameter, `unused` ones left out."""
        out = []
        for f in dataclasses.fields(cls):
            if f.name in cls.unused:
                continue
            tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out.append((f.name, tp, f.default, f.metadata.get("doc", "")))
        return out


def check_range(cond: bool, where: str, key: str, what: str, value: Any) -> None:
    """ConfigError '<where>.<key> must be <what>, got <value>' unless cond."""
    if not cond:
        raise ConfigError(f"'{where}.{key}' must be {what}, got {value!r}.")


def check_choice(value: Any, choices: tuple, where: str, key: str) -> None:
    """ConfigError naming the key unless value is one of choices (nearest one suggested)."""
    if value not in choices:
        raise ConfigError(f"'{where}.{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}."
                          + suggest(str(value), [str(c) for c in choices]))
