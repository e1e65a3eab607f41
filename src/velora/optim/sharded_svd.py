"""FSDP2 (``fully_shard``) support for the SVD-projected optimizers: GaLoreAdamW and GradNormLoRP's optimizer.

A GaLore projector is the top-r singular vectors of the whole gradient (n, m), but under FSDP2 each rank holds a
block of its rows. Only a refresh (every ``update_proj_gap`` steps) needs the whole matrix:

    refresh:  every rank sends its rows (padded to ceil(n / world)) to group rank 0   dist.gather, (n, m) in all
              rank 0 runs the same ``svd_projector`` a single process runs on the same matrix
              rank 0 broadcasts the projector (m, r) or (n, r) to every rank         dist.broadcast
    between:  "right" (Q (m, r)): R = G_rows @ Q is this rank's rows of R, no communication
              "left"  (P (n, r)): R = P.T @ G is a sum over rows: each rank multiplies its rows of P and
                      all-reduces the (r, m) partial sums (r x m numbers per step, r/n of the gradient)

The projector is replicated (every rank holds the same tensor, computed once, so no two ranks can pick different
singular-vector signs); the moments of a "right" projection are row-sharded like the weight, those of a "left"
projection (r, m) are replicated. Rank 0 computes the SVD from the identical gathered matrix a single process would
see, so 2 ranks equal one process up to the reduction order of the gradient. ``CommTally`` counts the payload bytes
of every collective called here (what ``benchmarks/bench_fsdp.py`` reports).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.distributed as dist

from velora.core.runtime import state_dtype
from velora.optim.projections import svd_projector
from velora.optim.sharded import is_sharded, local

__all__ = ["CommTally", "COMM_TALLY", "row_offset", "sharded_svd_projector", "project_left", "projector_rows"]


class CommTally:
    """Payload bytes handed to each kind of collective by this rank (the tensor each call sends or reduces)."""

    def __init__(self):
        self.bytes = Counter()

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        self.bytes[kind] += tensor.numel() * tensor.element_size()

    def reset(self) -> None:
        self.bytes.clear()


COMM_TALLY = CommTally()  # the optimizers' collectives on this process, read and reset by the benchmark


def row_offset(param) -> int:
    """The first global row of this rank's block of a ``Shard(0)`` DTensor (torch.chunk split, the last block may be
    shorter or empty)."""
    mesh = param.device_mesh
    block = math.ceil(int(param.shape[0]) / mesh.size())
    return min(mesh.get_local_rank() * block, int(param.shape[0]))


def _gather_rows_on_root(grad, group) -> torch.Tensor | None:
    """The whole (n, m) gradient on group rank 0 (None elsewhere) from each rank's rows, padded to one block."""
    rows, world = int(grad.shape[0]), dist.get_world_size(group)
    block = math.ceil(rows / world)
    mine = local(grad)  # (n_local, m)
    padded = mine.new_zeros((block,) + tuple(mine.shape[1:]))  # (ceil(n / world), m)
    padded[: mine.shape[0]] = mine
    root = dist.get_rank(group) == 0
    blocks = [torch.empty_like(padded) for _ in range(world)] if root else None
    COMM_TALLY.add("svd_gather", padded)
    dist.gather(padded, blocks, group=group, dst=dist.get_global_rank(group, 0))  # dst: torch >= 2.4
    return torch.cat(blocks)[:rows] if root else None  # (n, m)


def sharded_svd_projector(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """``svd_projector(whole gradient, rank, side)`` replicated on every rank: computed on group rank 0 from the
    gathered rows of an FSDP2 gradient and broadcast; a plain gradient goes straight to ``svd_projector``."""
    if not is_sharded(grad):
        return svd_projector(grad, rank, side)
    group = grad.device_mesh.get_group()
    whole = _gather_rows_on_root(grad, group)  # (n, m) on rank 0, None elsewhere
    projected_dim = int(grad.shape[0] if side == "left" else grad.shape[1])
    projector = torch.empty(projected_dim, rank, dtype=state_dtype(grad.dtype), device=local(grad).device)
    failure = None
    if whole is not None:
        try:
            projector = svd_projector(whole, rank, side)  # (n, r) or (m, r)
        except (ValueError, RuntimeError) as err:  # NaN/Inf gradient, failed SVD: every rank must hear of it
            failure, projector = err, projector.fill_(float("nan"))
    COMM_TALLY.add("svd_broadcast", projector)
    dist.broadcast(projector, group=group, src=dist.get_global_rank(group, 0))  # rank 0's signs and order
    if failure is not None:
        raise failure
    if not bool(torch.isfinite(projector[:1, :1]).all()):  # rank 0 failed: its NaN projector says so
        raise ValueError("the SVD refresh failed on process rank 0 (its error names the cause: a NaN/Inf gradient "
                         "or a failed SVD); every rank stops")
    return projector


def projector_rows(projector: torch.Tensor, param) -> torch.Tensor:
    """This rank's rows of a "left" projector P (n, r) of an FSDP2 parameter (all of P for a plain one)."""
    if not is_sharded(param):
        return projector
    start = row_offset(param)
    return projector[start: start + local(param).shape[0]]  # (n_local, r)


def project_left(projector: torch.Tensor, grad_rows: torch.Tensor, param) -> torch.Tensor:
    """P.T @ G (r, m) for the whole gradient, from this rank's rows of G: a local product plus an all-reduce of the
    (r, m) partial sums under FSDP2."""
    low_grad = projector_rows(projector, param).T @ grad_rows  # (r, m), this rank's rows' share
    if is_sharded(param):
        COMM_TALLY.add("left_all_reduce", low_grad)
        dist.all_reduce(low_grad, group=param.device_mesh.get_group())
    return low_grad
