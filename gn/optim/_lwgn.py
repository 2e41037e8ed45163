"""Layerwise Gauss-Newton as a curvature backend ("g_fisher") for other optimizers.

For a batch and a partition of the parameters into blocks b, the layerwise GN
direction is

    g_fisher_b = (G_bb + λ I)⁻¹ g_b        for every block b,

with G = Jᵀ H_z J the Gauss-Newton matrix of the batch's mean loss (docs/methods.md §4;
Abreu et al. 2025 §layerwise GN). It is solved matrix-free by block conjugate
gradient: every block runs its own CG recursion and one block-diagonal GGN
product per iteration serves all blocks (`gn.curvature.block_conjugate_gradient`).

Compositions registered here:
    lwgn    θ ← θ − lr · LwGN⁻¹ g                      (natural-gradient descent, optional momentum)
    fog_gn  θ ← θ − lr · Muon(LwGN⁻¹ g)               on hidden matrices; AdamW on the rest
            (FOG's operator composition with GN as the statistical operator)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gn import curvature
from gn.optim._muon import muon
from gn.paths import is_hidden_matrix, map_with_path, param_name, top_level


def layerwise_gn_direction(apply_fn: Callable, params: Any, inputs: Any, targets: Any, grads: Any, *,
                           mask: Any = None, loss: str = "cross_entropy", partition: Any = "per_tensor",
                           damping: float = 1e-3, max_iters: int = 50, tol: float = 1e-6,
                           block_mode: str = "batched") -> Any:
    """(G_bb + damping·I)⁻¹ g_b for every block b of `partition`, as a pytree like params.

    G is the GGN of the mean loss of `apply_fn(params, inputs)` against
    `targets` (masked by `mask`), applied matrix-free; all blocks are solved at
    once by block CG (`max_iters` products at most, relative residual `tol`).
    """
    matvec0 = curvature.ggn_operator(apply_fn, params, inputs, targets, mask=mask, loss=loss,
                                     partition=partition, block_mode=block_mode)

    def matvec(v):
        return jax.tree.map(lambda gv, x: gv + damping * x, matvec0(v), v)

    labels = curvature.make_partition(params, partition)[0]
    x, _ = curvature.block_conjugate_gradient(matvec, grads, labels, max_iters=max_iters, tol=tol)
    return x


class ScaleByLayerwiseGNState(NamedTuple):
    count: jnp.ndarray


def kernels_only(include_head: bool = False) -> Callable[[str, Any], bool]:
    """`only=` rule selecting the hidden 2-D kernels (and lm_head if asked): the leaves
    a Muon-composed optimizer preconditions; the rest keep their raw gradient."""
    def only(path: str, leaf: Any) -> bool:
        return getattr(leaf, "ndim", 0) == 2 and (
            is_hidden_matrix(path, leaf) or (include_head and top_level(path) == "lm_head"))

    return only


def _restricted_partition(only: Callable[[str, Any], bool] | None, partition: Any) -> Any:
    """Per-tensor blocks for leaves `only` selects; all other leaves share one block."""
    if only is None:
        return partition
    if partition != "per_tensor":
        raise ValueError("restricting the layerwise GN solve to some leaves needs partition='per_tensor'")

    def label(path, leaf):
        name = param_name(path)
        return name if only(name, leaf) else "__rest__"

    return label


def layerwise_gn_cost(params: Any, *, partition: Any = "per_tensor", max_iters: int = 50,
                      only: Callable[[str, Any], bool] | None = None) -> float:
    """value_and_grad equivalents of one layerwise-GN solve on the batch it reads (a FLOP
    estimate and an upper bound: CG may stop early at `tol`): one primal pass (2N of a
    gradient's 6N per token) and, per CG iteration, a tangent and a transpose (4N + 4N) per
    block, every block counted as a whole-network pass. The same estimate as the GN
    methods' (gn.methods.gauss_newton._flop_cost), so compute compares across the two."""
    blocks = len(curvature.make_partition(params, _restricted_partition(only, partition))[1])
    return (2.0 + 8.0 * blocks * max_iters) / 6.0


def _first(x: Any, k: int) -> Any:
    return x if (x is None or not k) else x[:k]


def scale_by_layerwise_gn(apply_fn: Callable, *, partition: Any = "per_tensor", damping: float = 1e-3,
                          max_iters: int = 50, tol: float = 1e-6, loss: str = "cross_entropy",
                          block_mode: str = "batched",
                          only: Callable[[str, Any], bool] | None = None,
                          curvature_batch: int = 0) -> optax.GradientTransformationExtraArgs:
    """Replace the gradient by the layerwise GN direction of the current batch.

    Extra args of `update`: `inputs`, `targets` and optionally `mask` (the batch
    the gradient came from). With `only(path, leaf)`, leaves it rejects keep
    their raw gradient (e.g. embeddings handed to AdamW). With `curvature_batch`
    k > 0, G is the GGN of the batch's first k sequences (an unbiased estimate of
    the same mean GGN; Martens 2010 §4.3 solves with a curvature batch smaller
    than the gradient's), while g stays the whole batch's gradient.
    """
    if curvature_batch < 0:
        raise ValueError(f"curvature_batch must be >= 0 (0 = the whole batch), got {curvature_batch}")
    part = _restricted_partition(only, partition)

    def init(params):
        del params
        return ScaleByLayerwiseGNState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, inputs=None, targets=None, mask=None, **extra):
        del extra
        if params is None or inputs is None or targets is None:
            raise ValueError("scale_by_layerwise_gn needs params and the batch (inputs=, targets=)")
        k = curvature_batch
        if k and k > inputs.shape[0]:
            raise ValueError(f"curvature_batch ({k}) is larger than the step's batch ({inputs.shape[0]} sequences)")
        inputs, targets, mask = _first(inputs, k), _first(targets, k), _first(mask, k)
        direction = layerwise_gn_direction(apply_fn, params, inputs, targets, updates, mask=mask, loss=loss,
                                           partition=part, damping=damping, max_iters=max_iters, tol=tol,
                                           block_mode=block_mode)
        if only is not None:
            keep = map_with_path(only, updates)
            direction = jax.tree.map(lambda k, d, g: d if k else g, keep, direction, updates)
        return direction, ScaleByLayerwiseGNState(count=state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def lwgn(learning_rate: optax.ScalarOrSchedule, apply_fn: Callable, *, momentum: float = 0.0,
         partition: Any = "per_tensor", damping: float = 1e-3, max_iters: int = 50,
         tol: float = 1e-6, block_mode: str = "batched", curvature_batch: int = 0) -> optax.GradientTransformationExtraArgs:
    """Natural-gradient descent with layerwise GN: θ ← θ − lr · m, m ← μ m + (G_bb + λI)⁻¹ g_b.

    Cost per step: up to `max_iters` block-diagonal GGN products, each about
    (number of blocks) tangent+transpose passes in `block_mode="batched"`
    (fewer with "unrolled", same numbers)."""
    parts = [scale_by_layerwise_gn(apply_fn, partition=partition, damping=damping, max_iters=max_iters, tol=tol,
                                   block_mode=block_mode, curvature_batch=curvature_batch)]
    if momentum:
        parts.append(optax.trace(decay=momentum))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def fog_gn(learning_rate: optax.ScalarOrSchedule, apply_fn: Callable, *, beta: float = 0.95,
           nesterov: bool = True, ns_steps: int = 5, damping: float = 1e-3, max_iters: int = 50,
           tol: float = 1e-6, block_mode: str = "batched", curvature_batch: int = 0,
           **adamw_side: Any) -> optax.GradientTransformationExtraArgs:
    """FOG-GN = Muon ∘ LwGN⁻¹ (docs/methods.md §4): θ ← θ − lr · u on the hidden matrices,

        u = `muon`'s core (bias-corrected Nesterov momentum β, `ns_steps` Newton–Schulz steps,
            √max(1, out/in); optax.contrib.muon's numbers) of d = (G_bb + λI)⁻¹ g_b,

    the per-tensor layerwise GN direction of each hidden matrix; embeddings, head and norms
    take the AdamW side of `with_adamw_side` on their raw gradients (options in `**adamw_side`)."""
    return optax.chain(
        scale_by_layerwise_gn(apply_fn, partition="per_tensor", damping=damping, max_iters=max_iters, tol=tol,
                              only=is_hidden_matrix, block_mode=block_mode, curvature_batch=curvature_batch),
        muon(learning_rate, beta=beta, nesterov=nesterov, ns_steps=ns_steps, **adamw_side),
    )
