"""A language model of one's own in the trainer: any flax Module from tokens to logits.

    model = FlaxLM(MyLM(vocab=320), vocab_size=320)
    train(cfg, "fog", workdir, model=model)      # gn.train.trainer.train

The trainer sees a model only as its parameter tree, `apply(params, tokens) -> logits`
and a parameter count (gn.model.init_params / make_apply / count_params dispatch on
FlaxLM). Its parameters are the module's `params` collection, a plain nested dict as the
LLaMA model's are, so masks chosen by parameter path (gn.optim.masks) and the K-FAC
statistics pass (gn.curvature.layer_stats, which finds every nn.Dense by path) apply to
it unchanged: FOG, DiagFog and the other statistics methods train it, as do the
first-order and Gauss-Newton methods. Name the embedding `embed` and the output layer
`lm_head` for the default masks to send them to the AdamW side, as in the LLaMA model.

The config's `model:` section is not used for such a run (config.yaml keeps it as
written); summary.json names the module and its parameter count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class FlaxLM:
    """A flax Module mapping int32 tokens [b, T] to logits [b, T, vocab_size], for the trainer."""

    module: Any
    vocab_size: int
    memory: None = None      # model.memory (plain / lean) is a LLaMA option; none here

    @property
    def name(self) -> str:
        return type(self.module).__name__

    def apply(self, params: Any, tokens: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, tokens)

    def init(self, rng: jax.Array) -> Any:
        return self.module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]

    def num_params(self) -> int:
        shapes = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))


__all__ = ["FlaxLM"]
