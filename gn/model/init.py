"""Parameter initialisation: the paper's distributions, drawn leaf by leaf.

Every random leaf is a slice of ONE normal draw over all random parameters in
tree order (embedding N(0, 1); dense kernels N(0, 1) times 1/sqrt(fan_in)); the
constant leaves (norm scales 1, QK-norm biases 0) take no part in it. That draw
is the toolkit's initialisation: committed results depend on its exact values.

Drawing it as one array compiles one program over all ~134M parameters of the
`150m` preset, slowly (XLA warns on GPU), and its size grows with depth and width.
Under JAX's partitionable threefry (`jax_threefry_partitionable`, the default
since JAX 0.5) the bits of element i of a draw depend only on (key, i): element
i is threefry2x32(key, counter i), then the usual bits -> uniform -> normal
transform. So each leaf's slice [offset, offset + size) is computed on its own
by a PRNG implementation (`_OFFSET_THREEFRY`) whose counters start at `offset`;
`jax.random.normal` supplies the same transform. One small program per distinct
(leaf shape, kind) is compiled and cached, with the offset a traced argument, so
compile time does not grow with depth and the values are bit-for-bit those of
the single draw (tests/test_model_init.py checks it).

With a non-threefry key or `jax_threefry_partitionable` off, the element/counter
correspondence does not hold, so the single draw (`_draw_all_at_once`) is used
and the values are again exactly the toolkit's initialisation for that setting.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np


def fan_in_normal(key, shape, dtype):
    """Paper init of a dense kernel (in, out): N(0, 1/fan_in), fan_in = shape[0]."""
    return jax.random.normal(key, shape, dtype) * jnp.asarray(1.0 / math.sqrt(shape[0]), dtype)


def unit_normal(key, shape, dtype):
    """N(0, 1) (the token embedding)."""
    return jax.random.normal(key, shape, dtype)


def ones(key, shape, dtype):
    """All ones (norm scales)."""
    del key
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    """All zeros (QK-norm biases)."""
    del key
    return jnp.zeros(shape, dtype)


# Initialiser by parameter leaf name, used by the flax modules (`Llama.init`);
# `draw_leaves` draws from the same distributions without running the model.
INITIALIZERS = {"kernel": fan_in_normal, "embedding": unit_normal, "scale": ones, "bias": zeros}
# Leaves that are not drawn at random.
CONSTANT_LEAVES = ("scale", "bias")


# ---------------------------------------------------------------- threefry with a counter offset

def _offset_bits(key: jax.Array, bit_width: int, shape: tuple) -> jax.Array:
    # key = (k1, k2, offset_hi, offset_lo): threefry2x32 of (k1, k2) at the 64-bit
    # counters offset + 0, 1, ..., exactly as jax's partitionable threefry
    # (`_threefry_random_bits_partitionable`) does at counters 0, 1, ...
    size = math.prod(shape)
    if size >= 2 ** 32:
        raise NotImplementedError("one parameter leaf of 2**32 elements or more")
    k1, k2, off_hi, off_lo = key[0], key[1], key[2], key[3]
    iota = jax.lax.iota(jnp.uint32, size).reshape(shape)
    lo = iota + off_lo
    hi = off_hi + (lo < off_lo).astype(jnp.uint32)   # carry of the 64-bit add
    bits1, bits2 = jex_random.threefry2x32_p.bind(k1, k2, hi, lo)
    if bit_width == 64:
        return (bits1.astype(jnp.uint64) << jnp.uint64(32)) | bits2.astype(jnp.uint64)
    out = bits1 ^ bits2
    return out if bit_width == 32 else out.astype({8: jnp.uint8, 16: jnp.uint16}[bit_width])


def _unsupported(*args):
    raise NotImplementedError("the offset-counter key only draws random bits")


_OFFSET_THREEFRY = jex_random.define_prng_impl(
    key_shape=(4,), seed=_unsupported, split=_unsupported, random_bits=_offset_bits,
    fold_in=_unsupported, name="gn_offset_threefry2x32", tag="gno")


def _slices_apply(rng: jax.Array) -> bool:
    # The per-leaf slices reproduce the single draw only for a threefry2x32 key
    # under the partitionable bit layout.
    if not jax.config.jax_threefry_partitionable:
        return False
    return jax.random.key_impl(rng) == jax.random.key_impl(jax.random.key(0, impl="threefry2x32"))


def _raw_key(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _draw_slice(raw_key: jax.Array, offset: jax.Array, shape: tuple, dtype: str, name: str) -> jax.Array:
    # Elements [offset, offset + size) of the single draw, as `shape`; offset is
    # traced, so one compilation serves every leaf of this shape and kind.
    key = jax.random.wrap_key_data(jnp.concatenate([raw_key, offset]), impl=_OFFSET_THREEFRY)
    unit = jax.random.normal(key, shape, dtype)
    if name == "embedding":
        return unit
    # The barrier keeps XLA from folding the scale into the normal transform's
    # own constant (sqrt(2) * erfinv(u) * c -> erfinv(u) * (sqrt(2) c)), which
    # rounds differently from the single draw, where it happens not to fold.
    return jax.lax.optimization_barrier(unit) * jnp.asarray(1.0 / math.sqrt(shape[0]), dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_all_at_once(rng: jax.Array, specs: tuple, dtype: str) -> list[jax.Array]:
    # The original scheme: one normal draw sliced into all random leaves. Compiles
    # one program over all parameters (slow for large models); used only where
    # the per-leaf slices cannot reproduce it (see the module docstring).
    n = sum(math.prod(shape) for name, shape in specs if name not in CONSTANT_LEAVES)
    flat = jax.random.normal(rng, (n,), dtype)
    out, offset = [], 0
    for name, shape in specs:
        if name in CONSTANT_LEAVES:
            out.append(INITIALIZERS[name](None, shape, dtype))
            continue
        size = math.prod(shape)
        unit = flat[offset:offset + size].reshape(shape)
        offset += size
        out.append(unit if name == "embedding" else unit * jnp.asarray(1.0 / math.sqrt(shape[0]), dtype))
    return out


def draw_leaves(rng: jax.Array, specs: tuple, dtype: str) -> list[jax.Array]:
    """Initial values of the leaves `specs` = ((leaf name, shape), ...) in tree order.

    Random leaves ("embedding", "kernel") are consecutive slices of one
    N(0, 1) draw of `rng` over all of them (kernels then scaled by 1/sqrt(fan_in));
    "scale" leaves are ones and "bias" leaves zeros. Computed slice by slice with
    one cached compilation per distinct (shape, name), never the whole draw at
    once (see the module docstring); the values do not depend on how it is computed.
    """
    if not _slices_apply(rng):
        return _draw_all_at_once(rng, specs, dtype)
    raw = _raw_key(rng)
    out, offset = [], 0
    for name, shape in specs:
        if name in CONSTANT_LEAVES:
            out.append(INITIALIZERS[name](None, shape, dtype))
            continue
        counter = np.array([offset >> 32, offset & 0xFFFFFFFF], np.uint32)
        out.append(_draw_slice(raw, counter, shape, dtype, name))
        offset += math.prod(shape)
    return out
