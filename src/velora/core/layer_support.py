"""Helpers of the VeLoRA layer (velora.core.layers) that know nothing of its surgery: autocast's casting rule, the
checkpoint-recompute test, the one-time check of a loaded v, and rank synchronisation of v's statistics."""

from __future__ import annotations

import torch
import torch.distributed as dist

from velora.core.runtime import is_distributed

# ---- guards --------------------------------------------------------------------------------------------


def autocast_cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """What autocast does to a linear's argument: floating tensors go to its dtype, except float64."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def in_checkpoint_recompute() -> bool:
    """True while torch.utils.checkpoint (non-reentrant) re-runs a forward inside backward.

    Reentrant checkpointing runs the original forward without grad, so its recompute is the only training
    forward and is not skipped: it runs outside these saved-tensor hooks.
    """
    if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:  # traced, or not in backward
        return False
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    pack = getattr(hooks[0], "__qualname__", "") if hooks else ""
    # _checkpoint_hook on top inside backward: a nested checkpoint's forward, run by an outer recompute
    return pack.startswith(("_recomputation_hook.", "_checkpoint_hook."))


def projection_problem(v: torch.Tensor) -> str | None:
    """Why (M, r) v (or each (M, r) of a per-group (G, M, r) v) is not a set of orthonormal columns, or None."""
    work = v.detach().to(torch.float64)
    if not torch.isfinite(work).all():
        return f"a non-finite velora_v (max |v| = {work.abs().max().item():.3g})"
    tolerance = max(1e-4, 8 * torch.finfo(v.dtype).eps)
    identity = torch.eye(v.shape[-1], dtype=torch.float64, device=v.device)  # (r, r)
    gram_error = (work.transpose(-1, -2) @ work - identity).abs().max()  # max over (r, r) / (G, r, r)
    if gram_error > tolerance:
        return f"a velora_v whose columns are not orthonormal (|VᵀV - I| = {gram_error.item():.3g})"
    return None


# ---- rank synchronisation (DDP: v identical on every rank from the first backward) ------------------


def distributed(enabled: bool) -> bool:
    return enabled and is_distributed()


def mean_over_ranks(mean: torch.Tensor, has_tokens: bool, enabled: bool) -> torch.Tensor | None:
    """The mean of the per-rank means over the ranks whose batch had tokens; None when none had.

    One all-reduce of [mean·w, w] (w = 1 for a rank with tokens): every rank takes part even with zero tokens,
    so an expert that got no tokens on one rank cannot hang the others.
    """
    if not distributed(enabled):
        return mean if has_tokens else None
    weight = 1.0 if has_tokens else 0.0
    packed = torch.cat([mean * weight, mean.new_full((1,), weight)])  # (M+1,)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    if packed[-1] == 0:
        return None
    return packed[:-1] / packed[-1]  # (M,)


def sum_over_ranks(tensor: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``tensor`` summed over every rank (a copy; the argument is not changed), or itself without a group."""
    if not distributed(enabled):
        return tensor
    total = tensor.contiguous().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def first_rank_with_tokens(has_tokens: bool, device, enabled: bool) -> int | None:
    """The lowest rank whose batch has tokens (the source of broadcast directions); None when no rank's has."""
    if not distributed(enabled):
        return 0 if has_tokens else None
    world = dist.get_world_size()
    candidate = torch.tensor([dist.get_rank() if has_tokens else world], device=device)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN)
    return None if int(candidate) == world else int(candidate)


def broadcast(tensor: torch.Tensor, enabled: bool, src: int = 0) -> torch.Tensor:
    if not distributed(enabled):
        return tensor
    tensor = tensor.contiguous().clone()
    dist.broadcast(tensor, src=src)
    return tensor
