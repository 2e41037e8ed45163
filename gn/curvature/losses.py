"""Output-space losses and their closed-form gradients and Hessian-vector products.

Conventions (shared by the whole `gn.curvature` package):

- `outputs` z has shape `P + (K,)`: P indexes positions (examples, or batch x
  sequence), K the classes / vocabulary / regression targets.
- "cross_entropy": softmax cross-entropy with integer `targets` of shape P.
- "mse": `targets` has the outputs' shape P + (K,); the per-position loss is the
  squared error summed over the last axis, ‖z − y‖².
- `mask` has shape P (1 = counted, 0 = ignored; fractional weights also work).
  The loss is the mean over counted positions,

      ℓ(z) = Σ_i m_i l_i(z_i) / n,   n = max(Σ_i m_i, 1).

Every quantity here is in closed form (no autodiff), in at least float32:

    cross-entropy:  g_z = (m / n) (p − e_y),   H_z v = (m / n) (p ⊙ v − p (pᵀ v)),   p = softmax(z)
    mse:            g_z = (2 m / n) (z − y),   H_z v = (2 m / n) v

For softmax cross-entropy H_z is the exact output Hessian (the Gauss-Newton
matrix of Schraudolph 2002 / Martens 2010 uses it in G = Jᵀ H_z J); applying it
directly avoids differentiating the gradient, which would cost another pass over
the vocabulary-sized logits.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from gn.errors import ConfigError, suggest

LOSSES = ("cross_entropy", "mse")


class CustomLoss(NamedTuple):
    """A user loss ℓ(z) = value(outputs, targets, mask) -> scalar (mean over positions).

    `hvp(outputs, targets, mask, v) -> H_z v` gives its output Hessian product in
    closed form; when None it is computed by forward-over-reverse autodiff,
    H_z v = ∂/∂ε ∇ℓ(z + ε v). For a Gauss-Newton model ℓ must be convex in z
    (H_z PSD), as cross-entropy and squared error are.
    """

    value: Callable
    hvp: Optional[Callable] = None


LossSpec = Union[str, CustomLoss, Callable]


def check_loss(loss: LossSpec) -> LossSpec:
    """Return `loss` if it is a supported loss name, a CustomLoss or a callable
    `(outputs, targets, mask) -> scalar`; else raise ConfigError (a ValueError)."""
    if callable(loss) or isinstance(loss, CustomLoss):
        return loss
    if loss not in LOSSES:
        raise ConfigError(
            f"unknown loss {loss!r}; valid losses are {', '.join(LOSSES)}." + suggest(str(loss), LOSSES))
    return loss


def _compute_dtype(dtype) -> jnp.dtype:
    # bf16/fp16 logits lose the small probability differences the Hessian depends on.
    return jnp.promote_types(dtype, jnp.float32)


def _check_shapes(outputs, targets, mask, loss: str) -> None:
    pos = tuple(outputs.shape[:-1])
    if loss == "cross_entropy" and tuple(targets.shape) != pos:
        raise ValueError(
            f"cross_entropy: targets must have shape outputs.shape[:-1] = {pos}, got {tuple(targets.shape)}.")
    if loss == "mse" and tuple(targets.shape) != tuple(outputs.shape):
        raise ValueError(
            f"mse: targets must have the outputs' shape {tuple(outputs.shape)}, got {tuple(targets.shape)}.")
    if mask is not None and tuple(mask.shape) != pos:
        raise ValueError(f"mask must have shape outputs.shape[:-1] = {pos}, got {tuple(mask.shape)}.")


def _position_scale(pos_shape, mask, dtype):
    """m_i / n with n = max(Σ m, 1); a scalar 1/n when there is no mask."""
    if mask is None:
        n = 1
        for s in pos_shape:
            n *= s
        return jnp.asarray(1.0 / max(n, 1), dtype)
    m = mask.astype(dtype)
    return m / jnp.maximum(jnp.sum(m), 1.0)


def _expand(scale):
    return scale[..., None] if jnp.ndim(scale) else scale


def _per_position_loss(z, targets, loss: str):
    if loss == "cross_entropy":
        # Clipped so that padding labels such as -1 at masked positions stay finite.
        y = jnp.clip(targets, 0, z.shape[-1] - 1).astype(jnp.int32)
        picked = jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(z, axis=-1) - picked
    diff = z - targets.astype(z.dtype)
    return jnp.sum(diff * diff, axis=-1)


def mean_loss(outputs, targets, mask=None, loss: str = "cross_entropy"):
    """Masked mean loss ℓ(z) = Σ_i m_i l_i(z_i) / max(Σ_i m_i, 1) (see the module docstring).

    cross_entropy: l_i = logsumexp(z_i) − z_i[y_i] with integer targets of shape
    outputs.shape[:-1]; mse: l_i = ‖z_i − y_i‖² with targets of the outputs' shape.
    `mask` has shape outputs.shape[:-1]. Computed in at least float32; differentiable.
    """
    if not isinstance(check_loss(loss), str):
        return _custom(loss).value(outputs, targets, mask)
    _check_shapes(outputs, targets, mask, loss)
    z = outputs.astype(_compute_dtype(outputs.dtype))
    per = _per_position_loss(z, targets, loss)
    scale = _position_scale(per.shape, mask, z.dtype)
    if mask is not None:
        # where, not just a product: masked positions may hold garbage (inf/NaN) losses.
        per = jnp.where(mask > 0, per, 0.0)
    return jnp.sum(scale * per)


class OutputCurvature(NamedTuple):
    """ℓ(z0), g_z = ∂ℓ/∂z and v ↦ H_z v at one output point z0 (all closed form)."""

    value: jax.Array
    grad: jax.Array
    hvp: Callable[[jax.Array], jax.Array]


def output_curvature(outputs, targets, mask=None, loss: str = "cross_entropy") -> OutputCurvature:
    """Loss value, gradient and Hessian-vector-product closure at z0 = `outputs`.

    The gradient and the closure work in the compute dtype (at least float32); the
    closure accepts v of the outputs' shape in any float dtype:

        cross-entropy:  H_z v = (m/n) (p ⊙ v − p (pᵀ v))
        mse:            H_z v = (2m/n) v
    """
    if not isinstance(check_loss(loss), str):
        return _custom_curvature(_custom(loss), outputs, targets, mask)
    _check_shapes(outputs, targets, mask, loss)
    dt = _compute_dtype(outputs.dtype)
    z = outputs.astype(dt)
    scale = _position_scale(z.shape[:-1], mask, dt)
    return weighted_curvature(z, targets, scale, None if mask is None else mask > 0, loss)


def weighted_curvature(z, targets, scale, keep, loss: str = "cross_entropy") -> OutputCurvature:
    """`output_curvature` with explicit per-position weights s_i (= m_i / n) and `keep` (m_i > 0, or None).

    ℓ = Σ_i s_i l_i(z_i) over kept positions; g_z and H_z v as in `output_curvature`
    with m/n replaced by s. `z` must already be in the compute dtype. A chunk of
    positions with the whole batch's weights gives that chunk's share of ℓ, g_z and
    H_z v, which is how `gn.curvature.chunked` evaluates the loss chunk by chunk.
    """
    dt = z.dtype
    s = _expand(scale)
    per = _per_position_loss(z, targets, loss)
    if keep is not None:
        # where, not just a product: masked positions may hold garbage (inf/NaN) losses.
        per = jnp.where(keep, per, 0.0)
    value = jnp.sum(scale * per)
    if loss == "cross_entropy":
        p = jax.nn.softmax(z, axis=-1)
        if keep is not None:
            # A non-finite logit at a masked position must not reach the counted ones (0 · NaN = NaN).
            p = jnp.where(_expand(keep), p, 0.0)
        onehot = jax.nn.one_hot(targets, z.shape[-1], dtype=dt)
        grad = s * (p - onehot)

        def hvp(v):
            v = v.astype(dt)
            pv = p * v
            return s * (pv - p * jnp.sum(pv, axis=-1, keepdims=True))
    else:
        diff = z - targets.astype(dt)
        if keep is not None:
            diff = jnp.where(_expand(keep), diff, 0.0)
        grad = 2.0 * s * diff

        def hvp(v):
            return 2.0 * s * v.astype(dt)

    return OutputCurvature(value, grad, hvp)


def weighted_loss(z, targets, scale, keep, loss: str = "cross_entropy"):
    """Σ_i s_i l_i(z_i) over kept positions (the value of `weighted_curvature`, nothing else)."""
    per = _per_position_loss(z, targets, loss)
    if keep is not None:
        per = jnp.where(keep, per, 0.0)
    return jnp.sum(scale * per)


def _custom(loss) -> CustomLoss:
    return loss if isinstance(loss, CustomLoss) else CustomLoss(loss)


def _custom_curvature(loss: CustomLoss, outputs, targets, mask) -> OutputCurvature:
    """ℓ, g_z by reverse mode and H_z v by the user's closed form or forward-over-reverse."""
    z = outputs.astype(_compute_dtype(outputs.dtype))
    fn = lambda zz: loss.value(zz, targets, mask)
    value, grad = jax.value_and_grad(fn)(z)
    if loss.hvp is not None:
        return OutputCurvature(value, grad, lambda v: loss.hvp(z, targets, mask, v.astype(z.dtype)))
    return OutputCurvature(value, grad, lambda v: jax.jvp(jax.grad(fn), (z,), (v.astype(z.dtype),))[1])


def loss_value_and_grad(outputs, targets, mask=None, loss: str = "cross_entropy"):
    """(ℓ(z), ∂ℓ/∂z) in closed form: g_z = (m/n)(softmax(z) − e_y) or (2m/n)(z − y)."""
    c = output_curvature(outputs, targets, mask, loss)
    return c.value, c.grad


def output_hessian_vector_product(outputs, targets, vector, mask=None, loss: str = "cross_entropy"):
    """H_z v with H_z = ∂²ℓ/∂z² at z = `outputs`, in closed form (see `output_curvature`)."""
    return output_curvature(outputs, targets, mask, loss).hvp(vector)
