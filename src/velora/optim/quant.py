"""Block-wise 8-bit storage for optimizer moments (CPU-friendly, no extra dependency).

Each tensor is flattened and cut into blocks of 256 values; a block stores its absolute maximum
(float32) and one byte per value. The byte holds a *companded* value so that small entries, which
dominate Adam moments, keep relative precision:
- signed moments (first moment): q = round(127 * sign(u) * sqrt(|u|)), u = x / absmax, int8;
- non-negative moments (second moment): q = round(255 * u ** (1/4)), uint8.
Bytes for a tensor of N values: N + 4 * ceil(N / 256).
"""

from __future__ import annotations

import math

import torch

__all__ = ["BLOCK_SIZE", "quantize_blockwise", "dequantize_blockwise", "quantized_bytes"]

BLOCK_SIZE = 256


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    padding = (-flat.numel()) % BLOCK_SIZE
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.view(-1, BLOCK_SIZE)  # (num_blocks, 256)


def quantize_blockwise(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes with the shape of ``values``: int8 if signed else uint8, absmax (num_blocks,) float32)."""
    if not signed and (values < 0).any():
        raise ValueError("quantize_blockwise(signed=False) got negative values; use signed=True")
    blocks = _blocks(values.detach().float().reshape(-1))  # (B, 256)
    absmax = blocks.abs().amax(dim=1)  # (B,)
    safe_absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    unit = blocks / safe_absmax[:, None]  # (B, 256) in [-1, 1]
    if signed:
        codes = torch.round(127.0 * torch.sign(unit) * unit.abs().sqrt()).to(torch.int8)
    else:
        codes = torch.round(255.0 * unit.sqrt().sqrt()).to(torch.uint8)
    codes = codes.reshape(-1)[: values.numel()].reshape(values.shape)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """float32 tensor with the shape of ``codes``."""
    signed = codes.dtype == torch.int8
    blocks = _blocks(codes.reshape(-1).float())  # (B, 256)
    if signed:
        unit = blocks / 127.0
        unit = torch.sign(unit) * unit * unit
    else:
        unit = (blocks / 255.0) ** 4
    values = unit * absmax[:, None]  # (B, 256)
    return values.reshape(-1)[: codes.numel()].reshape(codes.shape)


def quantized_bytes(numel: int) -> int:
    """Bytes of one block-wise 8-bit tensor of ``numel`` values (codes + per-block absmax)."""
    return numel + 4 * math.ceil(numel / BLOCK_SIZE)
