"""NF4 weight emulation for planning QLoRA on fake tensors (the planner traces without bitsandbytes' kernels).

An ``NF4Linear`` holds what a bitsandbytes ``Linear4bit`` with double quantisation holds:
two 4-bit codes per byte (0.5 byte/weight), one 8-bit absmax code per block of 64 weights and one fp32
scale per 256 absmax codes (≈0.516 byte/weight in all); tests/test_qlora.py checks these bytes against the real
layer. Not emulated: the per-layer code books bitsandbytes also keeps (16 NF4 levels, the 256-entry absmax map,
an offset; 1092 bytes of fp32 per layer, ~0.24 MB for LLaMA-7B's 224 linears).
Forward and backward dequantise the weight into a temporary of the compute dtype, use it and drop it, as the
CUDA kernel does; nothing but the packed buffers stays alive, and the layer saves only its input's gradient
path (the weight is frozen).
The values are a faithful NF4 round trip (the 16 levels of the QLoRA paper); the absmax codes are
plain linear 8-bit rather than bitsandbytes' dynamic map, which changes no byte count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmax codes per fp32 scale (double quantisation)

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, Dettmers et al.)
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def nf4_bytes_per_weight() -> float:
    return 0.5 + 1 / BLOCK + 4 / (BLOCK * ABSMAX_BLOCK)


def _blocks(count: int, size: int) -> int:
    return -(-count // size)


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O, D) float -> (packed uint8 (ceil(O·D/2),), absmax codes uint8 (blocks,), absmax scales fp32)."""
    flat = weight.detach().reshape(-1).float()  # (N,)
    count = flat.numel()
    blocks = _blocks(count, BLOCK)
    flat = F.pad(flat, (0, blocks * BLOCK - count)).view(blocks, BLOCK)  # (blocks, 64)
    absmax = flat.abs().amax(dim=1).clamp_min(1e-12)  # (blocks,)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=weight.device)  # (16,)
    codes = (flat / absmax[:, None]).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)  # (blocks, 64)
    codes = codes.to(torch.uint8).view(-1, 2)  # (N/2, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]  # (N/2,)
    # double quantisation: absmax in 8 bit with one fp32 scale per 256 blocks
    groups = _blocks(blocks, ABSMAX_BLOCK)
    padded = F.pad(absmax, (0, groups * ABSMAX_BLOCK - blocks)).view(groups, ABSMAX_BLOCK)  # (groups, 256)
    scales = padded.amax(dim=1).clamp_min(1e-12)  # (groups,)
    absmax_codes = (padded / scales[:, None] * 255).round().clamp(1, 255).to(torch.uint8).view(-1)[:blocks]
    packed = packed[: -(-count // 2)].clone()  # (ceil(N/2),) as bitsandbytes stores it: no codes for the padding
    return packed, absmax_codes.clone(), scales.contiguous()  # clone: drop the padding's bytes


def dequantize_nf4(packed: torch.Tensor, absmax_codes: torch.Tensor, scales: torch.Tensor,
                   shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_nf4``: a fresh (O, D) tensor of ``dtype``.

    Real tensors go through 8 slices so the index temporaries stay small next to the (O, D) result
    (≈1.3–1.5× the result in all); on fake tensors (the planner) only the result is allocated, exactly what
    bitsandbytes' fused CUDA kernel allocates."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(packed):
        # planning: the fused CUDA kernel's only allocation is the result, and fake values do not matter
        return torch.empty(shape, dtype=dtype, device=packed.device)  # (O, D)
    count = shape[0] * shape[1]
    blocks = absmax_codes.numel()
    levels = torch.tensor(NF4_LEVELS, dtype=dtype, device=packed.device)  # (16,)
    scale_per_block = scales.repeat_interleave(ABSMAX_BLOCK)[:blocks] / 255  # (blocks,) fp32
    absmax = (absmax_codes.float() * scale_per_block).to(dtype)  # (blocks,)
    if packed.numel() * 2 < blocks * BLOCK:  # the last block is partial: pad its codes back (zeros, dropped below)
        packed = F.pad(packed, (0, blocks * BLOCK // 2 - packed.numel()))  # (blocks·32,)
    out = torch.empty(blocks * BLOCK, dtype=dtype, device=packed.device)  # (blocks·64,)
    step = max(BLOCK, -(-blocks // 8) * BLOCK)  # weights per slice, a whole number of blocks
    for start in range(0, blocks * BLOCK, step):
        stop = min(start + step, blocks * BLOCK)
        half = packed[start // 2: stop // 2]  # (n/2,) uint8
        codes = torch.stack((half >> 4, half & 15), dim=1).view(-1).int()  # (n,) int32
        values = out[start:stop].view(-1, BLOCK)  # (n/64, 64) view into the result
        values.copy_(levels[codes].view(-1, BLOCK)).mul_(absmax[start // BLOCK: stop // BLOCK, None])
    return out[:count].view(shape)


class _NF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax_codes, scales, bias, shape):
        weight = dequantize_nf4(packed, absmax_codes, scales, shape, x.dtype)  # (O, D), temporary
        out = F.linear(x, weight, bias)  # (..., O)
        ctx.save_for_backward(packed, absmax_codes, scales)  # buffers: nothing new is kept
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax_codes, scales = ctx.saved_tensors
        weight = dequantize_nf4(packed, absmax_codes, scales, ctx.shape, grad_out.dtype)  # (O, D)
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None  # (..., D)
        return grad_x, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer stored as NF4 (the base layer of a QLoRA adapter)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_shape = torch.Size((linear.out_features, linear.in_features))
        packed, absmax_codes, scales = quantize_nf4(linear.weight)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("absmax_codes", absmax_codes)
        self.register_buffer("absmax_scales", scales)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.bias = bias
        self.compute_dtype = linear.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (a fresh tensor; for inspection, not for training)."""
        return dequantize_nf4(self.weight_packed, self.absmax_codes, self.absmax_scales, self.weight_shape,
                              self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4LinearFunction.apply(x, self.weight_packed, self.absmax_codes, self.absmax_scales, self.bias,
                                        self.weight_shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize_lora_base_layers(model: nn.Module) -> int:
    """Replace the frozen ``nn.Linear`` base layer of every peft LoRA layer by an ``NF4Linear``.
    Returns how many layers were quantised."""
    count = 0
    for module in list(model.modules()):
        base = getattr(module, "base_layer", None)
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and type(base) is nn.Linear:
            module.base_layer = NF4Linear(base)
            count += 1
    if count == 0:
        raise ValueError("qlora found no peft LoRA layer with an nn.Linear base to quantise; "
                         "check lora_targets")
    return count
