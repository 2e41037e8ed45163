"""FOG (Muon ∘ K-FAC⁻¹) in a plain optax chain on a flax MLP (no gn trainer, no LLaMA model).

The MLP of examples/lwgn_mlp.py classifies 2-D points into 3 classes. Each step
one forward pass with `gn.curvature.layer_stats_vjp` gives the gradient and every
nn.Dense layer's input a and output gradient; `gn.optim.batch_factors` turns them
into K-FAC's A and G, and `gn.optim.fog` orthogonalises the K-FAC natural
gradient of each kernel (the biases go to its AdamW side).
    python examples/fog_mlp.py         # prints the loss before and after
"""
import jax
import optax

from gn import curvature, optim
from lwgn_mlp import MLP, data, fit     # the same MLP, data and loop (examples/ is on the path)


def main(steps: int = 30, learning_rate: float = 0.05) -> tuple[float, float]:
    x, y = data()
    model = MLP()
    params = model.init(jax.random.PRNGKey(1), x)          # {"params": {"Dense_0": ..., "Dense_1": ...}}
    # Both kernels are hidden matrices here (no 'embed' / 'lm_head'): Muon ∘ K-FAC⁻¹ on them.
    layers = optim.stat_layers(params, optim.matrix_mask_fn())
    tx = optim.fog(learning_rate, damping=1e-3, T_inv=1)
    loss = lambda p: curvature.mean_loss(model.apply(p, x), y)
    state, first = tx.init(params), float(loss(params))

    @jax.jit
    def step(p, s):
        logits, pullback, inputs = curvature.layer_stats_vjp(model, p, x)
        grads, output_grads = pullback(jax.grad(curvature.mean_loss)(logits, y))
        factors = optim.batch_factors(inputs, output_grads, layers)   # A = aᵀa/n, G = δᵀδ/n
        updates, s = tx.update(grads, s, p, factors=factors)
        return optax.apply_updates(p, updates), s

    return first, float(loss(fit(step, params, state, steps)))


if __name__ == "__main__":
    print("loss %.4f -> %.4f" % main())
