"""Helpers shared by the fused LoRA + VeLoRA tests (test_lora_fused.py, test_qlora.py)."""

from __future__ import annotations

import torch
from torch import nn

from velora import VeLoRAConfig, apply_velora


def with_velora(model: nn.Module, default_sub_token_size: int, **overrides) -> nn.Module:
    """VeLoRA in adapter mode on the ``up`` / ``down`` layers of a two-layer test model (``overrides`` win)."""
    config = dict(sub_token_size=default_sub_token_size, target_modules=["up", "down"], mode="adapter")
    config.update(overrides)
    return apply_velora(model, VeLoRAConfig(**config))


def forward_backward(model: nn.Module, x: torch.Tensor):
    """Output, input grad and every trainable grad of one forward/backward with a fixed upstream gradient."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).to(out.dtype).view_as(out))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def fused_ran(layer: nn.Module, model: nn.Module, x: torch.Tensor) -> bool:
    """True if ``layer``'s output came out of the fused LoRA + VeLoRA Function on ``model(x)`` (a forward hook on
    the fused layer itself does not block fusion)."""
    seen = []
    handle = layer.register_forward_hook(
        lambda module, args, output: seen.append(type(output.grad_fn).__name__ if output.grad_fn else None))
    model(x)
    handle.remove()
    return seen[0] == "LoRAVeLoRAFunctionBackward"
