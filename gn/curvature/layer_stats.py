"""Per-layer K-FAC statistics of any flax model: each dense layer's input a and output gradient δ.

K-FAC (and FOG, DiagFog, PI-Muon: `gn.optim`) need, for every dense layer y = a W
(+ b) with a 2-D kernel W (in, out), the layer's input rows a (n, in) and the
gradient of the loss with respect to its output rows, ∂ℓ̄/∂y (n, out). This
module gets both from one forward pass of an unmodified flax model: a method
interceptor (`flax.linen.intercept_methods`) wraps the `__call__` of every dense
layer, records its input and adds a zero perturbation e to its output, so that
∂ℓ̄/∂e = ∂ℓ̄/∂y. The pullback of one `jax.vjp` then gives ∇θ ℓ̄ and every layer's
∂ℓ̄/∂y at once (`layer_stats_vjp`).

Dense layers are found by parameter path (`gn.paths`): a module is one when the
parameter tree holds a 2-D leaf named "kernel" at its module path, and its call
maps (..., in) to (..., out) (flax's `nn.Dense`, the LLaMA model's `Dense2D` and
`lm_head` alike; biases are allowed). Inputs and outputs of more than two axes
are flattened to rows: a is (n, in) with n the product of the leading axes.

The trees mirror the parameter tree as passed (flax's {"params": ...} wrapper
kept when the params carry it), with the leaf name "kernel" replaced:
`inputs[...]["Dense_0"]["inputs"]` holds a (n, in) and the output gradients
`[...]["Dense_0"]["outputs"]` hold ∂ℓ̄/∂y (n, out), e.g. for the LLaMA model
`inputs["block_0"]["attn"]["wq"]["inputs"]` and `inputs["lm_head"]["inputs"]`.
These are the trees `gn.optim.batch_factors(inputs, output_grads, stat_layers(params, mask))`
reads.

Limits: every dense layer must be called once per forward pass, inside the flax
`apply` that `apply_fn` runs on `params` (not in a nested `Module.apply` under
`lax.scan` or `jax.checkpoint`, e.g. the LLaMA model's `scan_layers` / `remat`
blocks: run that model unrolled for its statistics, and with `logits_chunk` 0, since a
`gn.split.SplitApply` runs its head outside flax); all three are checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gn.paths import param_keys, path_keys
from gn.split import SplitApply

Path = tuple[str, ...]
ApplyLike = Any   # a flax Module (its `apply` is used) or a function apply(params, *args, **kwargs)


def dense_layers(params: Any) -> dict[Path, Path]:
    """Dense layers by module path: {module path (wrapper stripped): tree path (wrapper kept)}.

    One entry per 2-D leaf named "kernel", e.g. {('Dense_0',): ('params', 'Dense_0')}
    for flax variables or {('block_0', 'attn', 'wq'): ('block_0', 'attn', 'wq')} for
    the bare LLaMA parameter tree.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = path_keys(path)
        if keys and keys[-1] == "kernel" and getattr(leaf, "ndim", 0) == 2:
            out[param_keys(path)[:-1]] = keys[:-1]
    return out


def _insert(tree: dict, keys: Path, value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _lookup(tree: Any, keys: Path) -> Any:
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:     # dicts and flax FrozenDicts
            return None
        tree = tree[k]
    return tree


def _apply_fn(model: ApplyLike) -> Callable[..., Any]:
    if isinstance(model, SplitApply):
        raise ValueError("layer statistics need the model's plain apply: a SplitApply (logits_chunk > 0) runs "
                         "its head outside flax, so the head's dense layer would go unseen.")
    return model.apply if isinstance(model, nn.Module) else model


def _run(model: ApplyLike, params: Any, perturbations: Optional[Any], args: tuple, kwargs: dict,
         layers: Optional[Sequence[Path]] = None) -> tuple[Any, dict, dict]:
    """Forward pass with the interceptor: (output, inputs tree, output rows by tree path).

    With `perturbations` None nothing is added (used to find the output shapes).
    """
    found = dense_layers(params)
    if layers is not None:    # kernel paths as in the tree: keep those layers only
        wanted = {tuple(k)[:-1] for k in layers}
        found = {m: t for m, t in found.items() if t in wanted}
    kernels = {m: _lookup(params, t + ("kernel",)).shape for m, t in found.items()}
    inputs: dict = {}
    outputs: dict = {}
    root: list = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if module.scope is None:
            return next_fun(*args, **kwargs)
        if not root:
            root.append(module.scope.root)
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        if module.scope.root is not root[0]:
            if module.has_variable("params", "kernel") and getattr(
                    module.get_variable("params", "kernel"), "ndim", 0) == 2:
                raise ValueError(
                    f"layer statistics: the dense layer {'/'.join(path) or module.name!r} runs in a nested "
                    "flax apply (e.g. under lax.scan or jax.checkpoint: the LLaMA model's scan_layers / "
                    "remat), outside the model's own scope; run the model unrolled for its statistics.")
            return next_fun(*args, **kwargs)
        if path not in kernels or not args:
            return next_fun(*args, **kwargs)
        x = args[0]
        y = next_fun(*args, **kwargs)
        n_in, n_out = kernels[path]
        if not (hasattr(x, "shape") and hasattr(y, "shape") and x.ndim >= 1 and y.ndim >= 1
                and x.shape[-1] == n_in and y.shape[-1] == n_out):
            return y      # not a dense call x @ kernel: no statistics for it
        tree_path = found[path]
        if tree_path in outputs:
            raise ValueError(f"layer statistics: the dense layer '{'/'.join(tree_path)}' is called more than "
                             "once in one forward pass; its statistics would be ambiguous.")
        a = x if x.ndim == 2 else x.reshape(-1, n_in)
        _insert(inputs, tree_path + ("inputs",), a)
        rows = y if y.ndim == 2 else y.reshape(-1, n_out)
        outputs[tree_path] = jax.ShapeDtypeStruct(rows.shape, rows.dtype)
        if perturbations is None:
            return y
        e = _lookup(perturbations, tree_path + ("outputs",))
        if e is None:
            raise ValueError(f"layer statistics: no perturbation for '{'/'.join(tree_path)}' "
                             "(build them with `layer_perturbations` on the same inputs)")
        return y + (e if y.ndim == 2 else e.reshape(y.shape))

    with nn.intercept_methods(interceptor):
        out = _apply_fn(model)(params, *args, **kwargs)
    return out, inputs, outputs


def layer_perturbations(model: ApplyLike, params: Any, *args: Any, layers: Optional[Sequence[Path]] = None,
                        **kwargs: Any) -> dict:
    """Zero perturbations for `apply_with_layer_stats` at these inputs' shapes.

    One entry per dense layer (or per kernel path in `layers`), at the layer's
    tree path with leaf name "outputs", zeros of shape (n, out) in the layer's
    output dtype. Costs no compute (shapes from `jax.eval_shape`).
    """
    shapes = jax.eval_shape(lambda p: _run(model, p, None, args, kwargs, layers)[2], params)
    tree: dict = {}
    for tree_path, s in shapes.items():
        _insert(tree, tree_path + ("outputs",), jnp.zeros(s.shape, s.dtype))
    return tree


def apply_with_layer_stats(model: ApplyLike, params: Any, perturbations: Any, *args: Any,
                           layers: Optional[Sequence[Path]] = None, **kwargs: Any) -> tuple[Any, dict]:
    """(output, inputs): the model's output with `perturbations` added to the dense outputs.

    `jax.grad` with respect to `perturbations` gives each layer's ∂ℓ̄/∂y (n, out);
    `inputs` holds each layer's input rows a (n, in) (see the module docstring),
    so the kernel gradient is aᵀ ∂ℓ̄/∂y.
    """
    out, inputs, _ = _run(model, params, perturbations, args, kwargs, layers)
    return out, inputs


def layer_stats_vjp(model: ApplyLike, params: Any, *args: Any, layers: Optional[Sequence[Path]] = None,
                    **kwargs: Any) -> tuple[Any, Callable[[Any], tuple[Any, dict]], dict]:
    """(output, pullback, inputs) of one forward pass with zero perturbations.

    pullback(∂ℓ/∂output) returns (∇θ ℓ, output_grads), output_grads the tree of
    ∂ℓ/∂y at every dense layer ({...: {"outputs": (n, out)}}); it may be called
    more than once (e.g. a second time with sampled labels for the true Fisher).
    """
    perts = layer_perturbations(model, params, *args, layers=layers, **kwargs)
    return jax.vjp(lambda p, e: apply_with_layer_stats(model, p, e, *args, layers=layers, **kwargs),
                   params, perts, has_aux=True)
