"""Learning-rate schedules: constant, warmup + cosine, warmup-stable-decay.

All are optax schedules `step -> lr` over `total_steps` optimizer updates.

Their scalars can be arguments of a compiled program. A `Schedule` keeps the
floats it multiplies and adds (the peak, the floor, ... computed on the host in
float64, as Python constants were) in `constants`. Called inside `bound(...)`,
it reads them from the traced arguments it is given instead. The ops and the
float32 values are the same either way, so a step compiled with the rate as an
argument computes the same numbers as one with the rate folded in. One compiled
program, and one persistent-cache entry, then serves every learning rate of a
sweep (gn.methods.accumulate.AccumulatedMethod.bind_schedules). `collecting()`
records the schedules a method's builder makes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import jax.numpy as jnp

from gn.errors import ConfigError

SCHEDULES = ("constant", "cosine", "wsd")

_bound: dict[int, dict] = {}            # id(schedule) -> its traced scalars, inside `bound`
_collectors: list[list["Schedule"]] = []


class Schedule:
    """`step -> lr` as `fn(step, constants)`; `constants` are the floats it is built from."""

    def __init__(self, fn: Callable[[Any, dict], Any], constants: dict[str, float]):
        self._fn, self.constants = fn, dict(constants)
        for made in _collectors:
            made.append(self)

    def __call__(self, step):
        return self._fn(step, _bound.get(id(self), self.constants))

    def scaled(self, ratio: float) -> "Schedule":
        """This schedule times `ratio` (an AdamW side's peak relative to the method's)."""
        return Schedule(lambda step, c: self(step) * c["ratio"], {"ratio": ratio})

    def arguments(self) -> dict:
        """The constants as weak-typed float32 scalars: what `bound` is given for this schedule.
        Weak-typed, as the Python floats they replace are, so they promote no array's dtype."""
        return {k: jnp.asarray(float(v)) for k, v in self.constants.items()}


@contextlib.contextmanager
def collecting() -> Iterator[list[Schedule]]:
    """The list of every Schedule made inside the block (in order)."""
    made: list[Schedule] = []
    _collectors.append(made)
    try:
        yield made
    finally:
        _collectors.remove(made)


@contextlib.contextmanager
def bound(schedules: Sequence[Schedule], arguments: Sequence[dict]) -> Iterator[None]:
    """Inside the block, each schedule reads its scalars from its entry of `arguments` (tracers)."""
    old = dict(_bound)
    _bound.update({id(s): a for s, a in zip(schedules, arguments)})
    try:
        yield
    finally:
        _bound.clear()
        _bound.update(old)


def make_schedule(name: str, peak: float, total_steps: int, *, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> Schedule:
    """Build a schedule.

    constant: linear warmup to `peak`, then flat.
    cosine:   linear warmup, then cosine decay to `min_lr_ratio * peak` at `total_steps`.
    wsd:      warmup, stable at `peak`, then linear decay to `min_lr_ratio * peak`
              over the last `decay_fraction` of the steps (Hu et al. 2024, MiniCPM).
    """
    if name not in SCHEDULES:
        raise ConfigError(f"Unknown schedule '{name}'; valid: {', '.join(SCHEDULES)}.")
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    floor = peak * min_lr_ratio
    # The floats each formula multiplies and adds, computed here in float64 as the Python
    # constants of the formulas were: (peak - floor) * 0.5 is one constant, not two operations.
    constants = {"peak": peak, "floor": floor, "half_span": (peak - floor) * 0.5, "drop": floor - peak}

    def warm(step, c):
        if warmup_steps == 0:
            return jnp.asarray(c["peak"], jnp.float32)
        return c["peak"] * jnp.minimum(1.0, (step + 1) / warmup_steps)

    if name == "constant":
        return Schedule(warm, {"peak": peak})
    if name == "cosine":
        span = max(total_steps - warmup_steps, 1)

        def cosine(step, c):
            t = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
            decayed = c["floor"] + c["half_span"] * (1.0 + jnp.cos(jnp.pi * t))
            return jnp.where(step < warmup_steps, warm(step, c), decayed)

        return Schedule(cosine, {k: constants[k] for k in ("peak", "floor", "half_span")})
    decay_steps = max(int(round(decay_fraction * total_steps)), 1)
    decay_start = max(total_steps - decay_steps, warmup_steps)

    def wsd(step, c):
        t = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
        decayed = c["peak"] + c["drop"] * t
        return jnp.where(step < warmup_steps, warm(step, c), decayed)

    return Schedule(wsd, {k: constants[k] for k in ("peak", "drop")})


__all__ = ["SCHEDULES", "Schedule", "make_schedule", "collecting", "bound"]
