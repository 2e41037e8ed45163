"""A model split at its output head, for evaluating logits in chunks of tokens.

Language-model logits are (tokens × vocabulary): 32k tokens × 32k vocabulary is
4.2 GB in float32, and a Gauss-Newton step keeps several such tensors (z0, J d,
H_z J d, their cotangents). A `SplitApply` writes the model as

    z = f(θ, x) = head(θ, body(θ, x)),   h = body(θ, x) of shape targets.shape + (D,),

with a `head` that acts on each token's row of h independently (an affine map
such as the untied LM head). Everything that consumes logits can then run over
chunks of `chunk` tokens in a `lax.scan`, holding one (chunk × vocabulary) block
at a time; `gn.curvature` does so whenever it is given a SplitApply. Calling a
SplitApply returns the full logits, so code that needs them still works.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True, eq=False)
class SplitApply:
    """apply(θ, x) = head(θ, body(θ, x)), with the head evaluated `chunk` tokens at a time.

    `body(params, inputs) -> h`, h of shape targets.shape + (D,); `head(params, h2)
    -> z2` maps rows (n, D) to logits (n, V) row by row. `chunk` > 0 is the
    number of tokens per chunk. Hashing is by identity, so a SplitApply can be a
    static argument of `jax.jit` like a plain function.
    """

    body: Callable[[Any, Any], Any]
    head: Callable[[Any, Any], Any]
    chunk: int

    def __post_init__(self):
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk <= 0:
            raise ValueError(f"SplitApply.chunk must be a positive integer, got {self.chunk!r}.")

    def __call__(self, params: Any, inputs: Any) -> Any:
        h = self.body(params, inputs)
        lead = h.shape[:-1]
        z = self.head(params, h.reshape(-1, h.shape[-1]))
        return z.reshape(*lead, z.shape[-1])
