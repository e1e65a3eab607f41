"""The VeLoRA linear autograd function.

Forward is exactly ``F.linear(x, W, b)``; instead of x it saves z = group(x)·V (T × D/M × r).
Backward: grad_x = G W (exact), grad_b = ΣG, grad_W by the factored identity (Gᵀz) ⊗ V, so the
reconstructed x̂ is never materialised (see DESIGN.md §2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from velora.subtoken import _as, compress, factored_weight_grad


class VeLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, directions, scale):
        # x: (..., D), weight: (O, D), bias: (O,) or None, directions: (M, r)
        out = F.linear(x, weight, bias)  # (..., O)
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        z = compress(x.detach(), directions) if needs_w else None  # (T, G, r)
        ctx.save_for_backward(z, weight if needs_x else None, directions if needs_w else None)
        ctx.x_shape = x.shape
        ctx.scale = float(scale)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, directions = ctx.saved_tensors
        in_features = ctx.x_shape[-1]
        grad_tokens = grad_out.reshape(-1, grad_out.shape[-1])  # (T, O)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_tokens.mm(_as(weight, grad_tokens.dtype)).view(ctx.x_shape)  # (..., D)
        if ctx.needs_input_grad[1]:
            grad_w = factored_weight_grad(grad_tokens, z, directions, in_features, ctx.scale)  # (O, D)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_tokens.sum(0)  # (O,)
        return grad_x, grad_w, grad_b, None, None


def velora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    directions: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` that keeps only the sub-token coefficients of x for backward.

    ``directions`` is (M, r) with orthonormal columns (or (M,) for rank 1); M must divide
    in_features unless the caller pads (the module wrapper handles padding via ``pad=True``).
    """
    if directions.dim() == 1:
        directions = directions.unsqueeze(1)
    if directions.dim() != 2:
        raise ValueError(f"directions of shape {tuple(directions.shape)} must be (M,) or (M, r)")
    return VeLoRALinearFunction.apply(x, weight, bias, directions, scale)
