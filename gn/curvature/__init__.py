"""Matrix-free Gauss-Newton curvature: GGN products, quadratic models, partitions, CG.

For a model z = apply_fn(θ, inputs) and the masked mean loss ℓ(z) (softmax
cross-entropy or squared error), the generalised Gauss-Newton matrix is
G = Jᵀ H_z J (Schraudolph 2002; Martens 2010), with J = ∂z/∂θ and H_z the
closed-form output Hessian. Everything here is matrix-free: one primal+tangent
pass (`jax.linearize`) and one transpose pass (`jax.linear_transpose`).

- `mean_loss`, `output_hessian_vector_product`: the loss and H_z v in closed form.
- `ggn_vector_product` / `ggn_operator`: G v, or the block-diagonal diag(G_bb) v.
- `quadratic_model`: Q (kind "gn") or the prox-linear model P, as q(θ) -> (value, grad).
- `make_partition`: block labels ("per_tensor", "transformer_blocks", callable).
- `conjugate_gradient`, `block_conjugate_gradient`: CG on pytrees (Hessian-free solves).
- `model_loss`, `ChunkedLinearization`: for a `gn.split.SplitApply` model, the loss,
  its gradient and every product above `chunk` tokens at a time, never forming the
  (tokens × vocabulary) logits (`gn.curvature.chunked`; used automatically).
- `layer_stats_vjp` (`gn.curvature.layer_stats`): each dense layer's input and output
  gradient, for K-FAC statistics, from one forward pass of any flax model.
"""

from gn.curvature.cg import CGInfo, block_conjugate_gradient, conjugate_gradient
from gn.curvature.chunked import ChunkedLinearization
from gn.curvature.chunked_loss import model_loss
from gn.curvature.layer_stats import apply_with_layer_stats, dense_layers, layer_perturbations, layer_stats_vjp
from gn.curvature.ggn import (
    BLOCK_MODES,
    BlockLinearization,
    Linearization,
    ggn_operator,
    ggn_vector_product,
    linearize,
)
from gn.curvature.losses import (
    LOSSES,
    CustomLoss,
    OutputCurvature,
    loss_value_and_grad,
    mean_loss,
    output_curvature,
    output_hessian_vector_product,
)
from gn.curvature.objective import ApplyFn, lm_loss, mean_entropy, split_batch
from gn.curvature.partition import PARTITIONS, block_ids, make_partition, path_name
from gn.curvature.quadratic import KINDS, QuadraticModel, quadratic_model

__all__ = [
    "BLOCK_MODES",
    "BlockLinearization",
    "CGInfo",
    "ChunkedLinearization",
    "KINDS",
    "LOSSES",
    "ApplyFn",
    "CustomLoss",
    "lm_loss",
    "mean_entropy",
    "split_batch",
    "Linearization",
    "OutputCurvature",
    "PARTITIONS",
    "block_conjugate_gradient",
    "block_ids",
    "conjugate_gradient",
    "ggn_operator",
    "ggn_vector_product",
    "linearize",
    "apply_with_layer_stats",
    "dense_layers",
    "layer_perturbations",
    "layer_stats_vjp",
    "loss_value_and_grad",
    "make_partition",
    "mean_loss",
    "model_loss",
    "output_curvature",
    "output_hessian_vector_product",
    "path_name",
    "QuadraticModel",
    "quadratic_model",
]
