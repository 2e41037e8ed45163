"""Layerwise Gauss-Newton as a curvature backend in a plain optax chain (no gn trainer).

A flax MLP classifies 2-D points into 3 classes; each step replaces the gradient
by the block-diagonal GN direction (G_bb + λI)⁻¹ g_b, one block per flax module.
    python examples/lwgn_mlp.py        # prints the loss before and after
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gn import curvature, optim


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(32)(x)))


def data():
    """256 points of the plane, labelled by which third of the circle they lie in."""
    x = jax.random.normal(jax.random.PRNGKey(0), (256, 2))
    y = (jnp.arctan2(x[:, 1], x[:, 0]) // (2 * jnp.pi / 3)).astype(jnp.int32) % 3
    return x, y


def fit(step, params, state, steps: int):
    """`steps` calls of the jitted `step(params, state) -> (params, state)`; the final parameters."""
    for _ in range(steps):
        params, state = step(params, state)
    return params


def main(steps: int = 30) -> tuple[float, float]:
    x, y = data()
    model = MLP()
    params = model.init(jax.random.PRNGKey(1), x)          # {"params": {"Dense_0": ..., "Dense_1": ...}}
    tx = optax.chain(optim.scale_by_layerwise_gn(model.apply, partition="top_level", damping=1e-3, max_iters=20),
                     optax.scale_by_learning_rate(0.5))
    loss = lambda p: curvature.mean_loss(model.apply(p, x), y)
    state, first = tx.init(params), float(loss(params))

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p, inputs=x, targets=y)
        return optax.apply_updates(p, updates), s

    return first, float(loss(fit(step, params, state, steps)))


if __name__ == "__main__":
    print("loss %.4f -> %.4f" % main())
