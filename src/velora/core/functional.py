"""The VeLoRA linear autograd function.

Forward is exactly ``F.linear(x, W, b)``; instead of x it saves z = group(x)·V (T × D/M × r).
Backward: grad_x = G W (exact), grad_b = ΣG, grad_W by the factored identity (Gᵀz) ⊗ V, so the
reconstructed x̂ is never materialised (see DESIGN.md §2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from velora.core.subtoken import (
    CoefficientFormat,
    QuantisedCoefficients,
    _as,
    compress,
    dequantise_coefficients,
    factored_weight_grad,
    quantise_coefficients,
)

DOUBLE_BACKWARD_REFUSED = (
    "double backward through a VeLoRA layer's weight gradient is not supported: it is built from the compressed "
    "input z, so its derivatives are not the plain layer's; exclude that layer (target_modules / filter_fn, or "
    "remove_velora) when you need higher-order gradients through it"
)


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on a first-order weight gradient built under ``create_graph=True``; differentiating it raises.

    ``anchor`` is any tensor that requires grad, so the returned gradient does too and its backward is reached.
    """

    @staticmethod
    def forward(ctx, grad, anchor):
        return grad.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(DOUBLE_BACKWARD_REFUSED)


def refuse_double_backward(grad: torch.Tensor | None, *sources: torch.Tensor | None) -> torch.Tensor | None:
    """Under ``create_graph=True``, return ``grad`` (computed without a graph) behind a node that refuses to be
    differentiated; otherwise return it unchanged. ``sources`` are the backward inputs it was built from."""
    if grad is None or not torch.is_grad_enabled():
        return grad
    anchor = next((t for t in sources if t is not None and t.requires_grad), None)
    return grad if anchor is None else _RefuseDoubleBackward.apply(grad.detach(), anchor)


class VeLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, directions, scale, kept_as=None):
        # x: (..., D), weight: (O, D), bias: (O,) or None, directions: (M, r); kept_as: None or a CoefficientFormat
        out = F.linear(x, weight, bias)  # (..., O)
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        z = compress(x.detach(), directions) if needs_w else None  # (T, G, r)
        kept = store_coefficients(ctx, z, kept_as)  # z, or its codes (T, G·r·bits/8), scales (T, 1), columns
        ctx.save_for_backward(*kept, weight if needs_x else None, directions if needs_w else None)
        ctx.x_shape = x.shape
        ctx.scale = float(scale)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # grad_x and grad_b are exact and built from differentiable ops, so double backward through them (input
        # gradient penalties) is exact; grad_W is refused there (DOUBLE_BACKWARD_REFUSED)
        *kept, weight, directions = ctx.saved_tensors
        z = load_coefficients(ctx, kept)  # (T, G, r)
        in_features = ctx.x_shape[-1]
        grad_tokens = grad_out.reshape(-1, grad_out.shape[-1])  # (T, O)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_tokens.mm(_as(weight, grad_tokens.dtype)).view(ctx.x_shape)  # (..., D)
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                grad_w = factored_weight_grad(grad_tokens, z, directions, in_features, ctx.scale)  # (O, D)
            grad_w = refuse_double_backward(grad_w, grad_tokens, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_tokens.sum(0)  # (O,)
        return grad_x, grad_w, grad_b, None, None, None


def store_coefficients(ctx, z: torch.Tensor | None, kept_as: CoefficientFormat | None) -> tuple:
    """The three tensors a VeLoRA op saves for z (T, G, r): (z, None, None) when ``kept_as`` is None, else its
    integer codes, per-token scales and per-column scales (``quantise_coefficients``); notes on ``ctx`` what
    ``load_coefficients`` needs to undo it."""
    ctx.z_format = kept_as if z is not None else None
    if ctx.z_format is None:
        return z, None, None
    ctx.z_shape, ctx.z_dtype = z.shape, z.dtype
    return tuple(quantise_coefficients(z, kept_as.bits, kept_as.columns))


def load_coefficients(ctx, kept: list) -> torch.Tensor | None:
    """z (T, G, r) back from the three tensors ``store_coefficients`` saved (rounded when it was quantised)."""
    if ctx.z_format is None:
        return kept[0]
    return dequantise_coefficients(QuantisedCoefficients(*kept), ctx.z_format.bits, ctx.z_shape, ctx.z_dtype)


def velora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    directions: torch.Tensor,
    scale: float = 1.0,
    bits: int | None = None,
    column_scales: bool = True,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` that keeps only the sub-token coefficients of x for backward.

    ``directions`` is (M, r) with orthonormal columns (or (M,) for rank 1), or (G, M, r): group g of every token
    projected on its own directions (G = in_features / M); M must divide in_features unless the caller pads (the
    module wrapper handles padding via ``pad=True``). ``bits`` (8 or 4) keeps z as integers with one scale per token
    (``VeLoRAConfig.coefficient_bits``), after one scale per coefficient column unless ``column_scales`` is False
    (``VeLoRAConfig.coefficient_scales``).
    """
    if directions.dim() == 1:
        directions = directions.unsqueeze(1)
    if directions.dim() not in (2, 3):
        raise ValueError(f"directions of shape {tuple(directions.shape)} must be (M,), (M, r) or (G, M, r)")
    groups = -(-x.shape[-1] // directions.shape[-2])  # ceil(D / M)
    if directions.dim() == 3 and directions.shape[0] != groups:
        raise ValueError(f"per-group directions of shape {tuple(directions.shape)} need {groups} groups for "
                         f"in_features={x.shape[-1]} and M={directions.shape[-2]}; pass ({groups}, M, r)")
    kept_as = None if bits is None else CoefficientFormat(bits, column_scales)
    return VeLoRALinearFunction.apply(x, weight, bias, directions, scale, kept_as)
