"""Learning-rate schedules: constant, warmup + cosine, warmup-stable-decay.

All are optax schedules `step -> lr` over `total_steps` optimizer updates.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from gn.errors import ConfigError

SCHEDULES = ("constant", "cosine", "wsd")


def make_schedule(name: str, peak: float, total_steps: int, *, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> optax.Schedule:
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

    def warm(step):
        if warmup_steps == 0:
            return jnp.asarray(peak, jnp.float32)
        return peak * jnp.minimum(1.0, (step + 1) / warmup_steps)

    if name == "constant":
        return lambda step: warm(step)
    if name == "cosine":
        span = max(total_steps - warmup_steps, 1)

        def cosine(step):
            t = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
            return jnp.where(step < warmup_steps, warm(step), decayed)

        return cosine
    decay_steps = max(int(round(decay_fraction * total_steps)), 1)
    decay_start = max(total_steps - decay_steps, warmup_steps)

    def wsd(step):
        t = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
        decayed = peak + (floor - peak) * t
        return jnp.where(step < warmup_steps, warm(step), decayed)

    return wsd
