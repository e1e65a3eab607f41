"""A FLoRA-compressed DDP communication hook: all-reduce each projectable matrix's seeded random projection
(kept_dim × r numbers instead of rows × cols) and decompress after the all-reduce.

Projections are regenerated from integer seeds (``velora.optim.projections``), never communicated: identical seeds
give bit-identical matrices on every rank. With a ``CompressedGradAccumulator`` the accumulated matrices are sent as
the accumulator's own (k × r) sums, which it hands over through ``compressed_grad`` (no second projection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from velora.core.runtime import work_dtype
from velora.optim.projections import (
    check_project_side,
    compression_plan,
    derive_seed,
    projectable_parameters,
    random_projection,
)
from velora.optim.projections import compress as compress_gradient  # (rows, cols) -> (kept_dim, r)
from velora.optim.projections import decompress as decompress_gradient  # (kept_dim, r) -> (rows, cols)

__all__ = ["FloraCommState", "flora_comm_hook", "register_flora_comm_hook", "bucket_wire_bytes",
           "compress_gradient", "decompress_gradient"]

@dataclass
class FloraCommState:
    """State of ``flora_comm_hook``: the projection rank, the base seed, and a step counter.

    ``param_index`` maps ``id(parameter)`` of each compressible matrix (``projectable_parameters``:
    attention/MLP linear weights; embeddings and the output head are sent whole, as the FLoRA paper keeps
    them uncompressed) to its position in ``module.parameters()``: the seed of a parameter's projection
    is ``derive_seed(seed, index, step)``, identical on every rank without any communication. ``step``
    advances once per synchronised backward (after the last bucket), so every step draws fresh
    projections (FLoRA's resampling; no projection outlives a step, so nothing else needs storing).
    ``wire_bytes``/``dense_bytes`` count what was all-reduced vs what plain DDP would send, summed over
    all steps, for the benchmark.

    ``project``: the side of each matrix that is projected, "smaller" (default: the same convention as
    ``Flora`` and ``CompressedGradAccumulator``, so one rank means one estimator everywhere) or
    "larger" (fewer bytes per rank). At equal bytes both have the same variance (it grows like
    projected side / r), so the side only decides what ``projection_rank`` buys.

    With ``accumulator`` (a ``CompressedGradAccumulator``), the matrices it compresses are sent as its own
    (k × r) sums instead (``accumulator.compressed_grad``), on the accumulator's side.
    """

    projection_rank: int
    seed: int = 0
    step: int = 0
    process_group: Any = None
    param_index: dict[int, int] = field(default_factory=dict)
    orthogonal: bool = False
    project: str = "smaller"
    wire_bytes: int = 0
    dense_bytes: int = 0
    accumulator: Any = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64), "seed": torch.tensor(self.seed, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step, self.seed = int(state["step"]), int(state["seed"])


@dataclass
class _Sent:
    """One gradient of a bucket as it goes on the wire: as is (``plan`` None) or compressed (k × r)."""

    grad: torch.Tensor  # (rows, cols), the bucket's view, overwritten after the all-reduce
    payload: torch.Tensor  # what is all-reduced, flat
    plan: Any = None
    projection: torch.Tensor | None = None  # (r, projected_dim)


def _sent_form(state: FloraCommState, grad: torch.Tensor, param: torch.Tensor) -> _Sent:
    """How ``grad`` travels: the accumulator's own sum, a fresh seeded projection, or the gradient itself."""
    accumulator = state.accumulator
    if accumulator is not None and accumulator.compresses(param):
        plan, compressed, projection = accumulator.compressed_grad(param)  # (k, r), (r, p): .grad = decompressed
        return _Sent(grad, compressed.reshape(-1).to(grad.dtype), plan, projection)  # (k * r,)
    index = state.param_index.get(id(param))  # None: not a projectable matrix
    plan = compression_plan(grad.shape, state.projection_rank, project=state.project) if index is not None else None
    if plan is None:
        return _Sent(grad, grad.reshape(-1))  # (numel,)
    dtype = work_dtype(grad.dtype)
    seed = derive_seed(state.seed, index, state.step)
    projection = random_projection(seed, plan.projected_dim, plan.rank, device=grad.device, dtype=dtype,
                                   orthogonal=state.orthogonal)  # (r, projected_dim)
    compressed = compress_gradient(grad.to(dtype), projection, plan.transposed)  # (kept_dim, r)
    return _Sent(grad, compressed.reshape(-1).to(grad.dtype), plan, projection)  # (kept_dim * r,)


def _write_back(sent: list[_Sent], reduced: torch.Tensor) -> None:
    """Each reduced piece into its gradient: copied, or decompressed with the projection it was sent with."""
    offset = 0
    for piece in sent:
        chunk = reduced[offset:offset + piece.payload.numel()]  # (numel sent,)
        offset += piece.payload.numel()
        if piece.plan is None:
            piece.grad.copy_(chunk.view_as(piece.grad))
        else:
            compressed = chunk.view(piece.plan.kept_dim, piece.plan.rank).to(piece.projection.dtype)  # (k, r)
            piece.grad.copy_(decompress_gradient(compressed, piece.projection, piece.plan.transposed))  # (rows, cols)


def flora_comm_hook(state: FloraCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce FLoRA-projected 2-D gradients instead of the full ones.

    Each projectable matrix's gradient G (rows × cols, ``projection_rank`` below its projected side, by default
    the smaller one) is sent as its projection onto a seeded Gaussian A (r × projected side),
    kept_dim × r numbers; everything else (biases, norms, embeddings, the output head, small matrices)
    is sent as is. After the all-reduce each rank decompresses, so the gradient the optimizer sees is
    mean_ranks(G)·AᵀA (or AᵀA·mean(G) when the rows are the projected side). That equals
    all-reduce-then-compress-then-decompress exactly (by linearity) and is an **unbiased** estimate of
    the mean gradient (E[AᵀA] = I), with variance shrinking as r grows; at r = the projected side with
    ``orthogonal=True`` it is exact.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()  # flat (numel,) view of every gradient in the bucket
    sent = [_sent_form(state, grad, param) for grad, param in zip(bucket.gradients(), bucket.parameters())]
    wire = torch.cat([piece.payload for piece in sent]).div_(dist.get_world_size(group))  # pre-divided like DDP's
    state.wire_bytes += wire.numel() * wire.element_size()
    state.dense_bytes += buffer.numel() * buffer.element_size()
    if bucket.is_last():
        state.step += 1  # the next backward draws fresh projections

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        _write_back(sent, fut.value()[0])
        return buffer

    return dist.all_reduce(wire, group=group, async_op=True).get_future().then(unpack)


# DDP checks the hook's annotations as objects; `from __future__ import annotations` made them strings
flora_comm_hook.__annotations__ = {"state": FloraCommState, "bucket": dist.GradBucket,
                                   "return": torch.futures.Future[torch.Tensor]}


def register_flora_comm_hook(ddp_model: nn.Module, rank: int, seed: int = 0, process_group: Any = None,
                             orthogonal: bool = False, accumulator: Any = None,
                             project: str = "smaller") -> FloraCommState:
    """Install ``flora_comm_hook`` on a ``DistributedDataParallel`` model; returns its state.

    ``rank`` is the projection rank r (matrices whose projected side, by default the smaller one, is
    <= r are sent uncompressed); ``project`` picks that side ("smaller" or "larger"). The
    compressed matrices are ``velora.optim.projectable_parameters(module)``. All ranks must pass the same
    ``seed``. Save ``state.state_dict()`` with your checkpoint to resume the projection sequence exactly.

    ``accumulator``: a ``CompressedGradAccumulator`` over the same model, used with ``no_sync`` on all but
    the last micro-batch. Its matrices are then sent as the accumulator's own (k × r) sums
    (``accumulator.compressed_grad``), all-reduced, and decompressed with the same A: the result is
    decompress(mean over ranks of C), i.e. the single-process FLoRA accumulation on the concatenated batch,
    with no second projection and its extra variance.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise ValueError(f"register_flora_comm_hook needs a DistributedDataParallel model, got "
                         f"{type(ddp_model).__name__}; wrap it with DDP(model) first")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive integer (the FLoRA projection rank)")
    check_project_side(project)
    compressible = {id(p) for p in projectable_parameters(ddp_model.module)}
    index = {id(p): i for i, p in enumerate(ddp_model.module.parameters()) if id(p) in compressible}
    state = FloraCommState(projection_rank=rank, seed=seed, process_group=process_group, param_index=index,
                           orthogonal=orthogonal, project=project, accumulator=accumulator)
    ddp_model.register_comm_hook(state, flora_comm_hook)
    return state


def bucket_wire_bytes(model: nn.Module, rank: int | None, dtype: torch.dtype | None = None,
                      project: str = "smaller") -> int:
    """Bytes one rank all-reduces per step for ``model``'s trainable parameters: plain DDP
    (``rank=None``) or ``flora_comm_hook`` at projection rank ``rank`` projecting the ``project`` side.
    Pure arithmetic, no process group."""
    compressible = {id(p) for p in projectable_parameters(model)}
    total = 0
    for param in model.parameters():
        if not param.requires_grad:
            continue
        size = (torch.empty((), dtype=dtype) if dtype is not None else param).element_size()
        plan = (compression_plan(param.shape, rank, project=project)
                if rank is not None and id(param) in compressible else None)
        total += size * (param.numel() if plan is None else plan.kept_dim * plan.rank)
    return total
