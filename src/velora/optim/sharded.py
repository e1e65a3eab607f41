"""FSDP2 (``fully_shard``) support for the seeded-projection methods: Flora momentum and CompressedGradAccumulator.

FSDP2 turns every parameter into a DTensor sharded along dim 0: each rank holds a block of rows. A seeded
projection needs no communication: every rank regenerates the same (r, p) matrix and applies it to its own rows,
provided the projected side p is the columns (dim 1), which every rank holds whole. So under FSDP2 a compressed
matrix always projects its columns: when the chosen side (``project="smaller"``/``"larger"``) is the rows, the
sides are switched (the state (rows, r) is then sharded like the weight) and the state records it in
``projected_axis`` so a single-process load keeps the same side. No full gradient is ever gathered.

The only communication is what a whole-matrix statistic needs (Adafactor's column means and RMS, the clip RMS):
a sum over the ranks of a (1, cols) vector or of two scalars per parameter, through ``ShardReducer``.
Only a 1-D mesh with ``Shard(0)`` placement is supported (FSDP2's default); other layouts are refused in one line.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist

from velora.optim.projections import CompressionPlan, compression_plan

__all__ = ["is_sharded", "check_row_sharded", "local", "like", "column_plan", "local_plan", "ShardReducer",
           "shard_state", "row_shards"]


def is_sharded(tensor) -> bool:
    """True for a DTensor (a parameter or gradient sharded by FSDP2)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def check_row_sharded(owner: str, param) -> None:
    """One-line error unless ``param`` is a plain tensor or a DTensor sharded on dim 0 over a 1-D mesh."""
    if not is_sharded(param):
        return
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(f"{owner}: a parameter of shape {tuple(param.shape)} is an FSDP2 DTensor with placements "
                         f"{placements} on a {param.device_mesh.ndim}-D mesh; only fully_shard's default (Shard(0) on "
                         "a 1-D mesh) is supported: drop shard_placement_fn / use a 1-D mesh, or use DDP")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's block of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def like(param: torch.Tensor, local_value: torch.Tensor) -> torch.Tensor:
    """``local_value`` (this rank's rows) wrapped like ``param``: a DTensor with its mesh and placements."""
    if not is_sharded(param):
        return local_value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_value, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def column_plan(shape, rank: int, force: bool, project: str) -> CompressionPlan | None:
    """``compression_plan`` forced to project the columns (dim 1), the side every FSDP2 rank holds whole.

    A plan that would project the rows takes the other side (for a non-square matrix the other rule
    projects the columns); a square matrix always projects its columns already."""
    plan = compression_plan(shape, rank, force, project)
    if plan is None or not plan.transposed:
        return plan
    other = "larger" if project == "smaller" else "smaller"
    return compression_plan(shape, rank, force, other)


def local_plan(plan: CompressionPlan | None, local_rows: int) -> CompressionPlan | None:
    """The plan of this rank's rows: the kept side (rows, never transposed under FSDP2) shrinks to its block."""
    if plan is None:
        return None
    if plan.transposed:
        raise ValueError("a sharded plan must project the columns; build it with column_plan")
    return replace(plan, kept_dim=local_rows)


class ShardReducer:
    """Whole-matrix statistics of a tensor whose rows may be spread over the ranks of ``group``.

    Without a group (a plain tensor) every method computes exactly what the single-process code always did,
    so the non-sharded path stays bitwise unchanged."""

    def __init__(self, param: torch.Tensor):
        self.group = param.device_mesh.get_group() if is_sharded(param) else None
        self.rows = int(param.shape[0]) if param.dim() >= 1 else 1  # the global row count
        # Adafactor's factored statistics reduce dim -2; only for a matrix is that the sharded dim 0
        self.rows_sharded = self.group is not None and param.dim() == 2
        self.numel = param.numel()  # the global element count (DTensor.numel is global)

    def norm(self, tensor: torch.Tensor) -> float:
        """The L2 norm of the whole (global) tensor; divide by sqrt(``self.numel``) for its RMS."""
        if self.group is None:
            return tensor.norm(2).item()
        square_sum = tensor.double().square().sum().reshape(1)  # (1,), this rank's rows
        dist.all_reduce(square_sum, group=self.group)
        return math.sqrt(square_sum.item())

    def column_mean_square(self, grad: torch.Tensor) -> torch.Tensor:
        """mean over all rows of grad^2, per column: (..., 1, cols)."""
        if not self.rows_sharded:
            return torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))  # (..., 1, m)
        column_sum = grad.square().sum(dim=-2, keepdim=True)  # (..., 1, m), this rank's rows
        dist.all_reduce(column_sum, group=self.group)
        return column_sum.div_(self.rows)

    def row_mean(self, row_stat: torch.Tensor) -> torch.Tensor:
        """mean over all rows of a (..., rows, 1) statistic: (..., 1, 1)."""
        if not self.rows_sharded:
            return row_stat.mean(dim=-2, keepdim=True)  # (..., 1, 1)
        row_sum = row_stat.sum(dim=-2, keepdim=True)  # (..., 1, 1), this rank's rows
        dist.all_reduce(row_sum, group=self.group)
        return row_sum.div_(self.rows)


# --- state dicts: each rank's rows as a DTensor, so torch.distributed.checkpoint can save and reshard them -------

ROW_SHARDED_KEYS = ("momentum", "row_var", "exp_avg_sq", "variance")  # state laid out along the weight's rows


def shard_state(param: torch.Tensor, state: dict, row_keys: tuple[str, ...] = ROW_SHARDED_KEYS) -> dict:
    """``state`` of an FSDP2 parameter with its row-laid-out tensors (``row_keys``) wrapped as ``Shard(0)`` DTensors
    of the whole weight's row count (what DCP's ``get_optimizer_state_dict`` expects); the other tensors are the same
    on every rank (replicated) and stay plain; a plain parameter's state as it is."""
    if not is_sharded(param):
        return state
    if any(key.endswith("_codes") for key in state):
        raise ValueError(f"a {tuple(param.shape)} FSDP2 parameter holds an 8-bit (eight_bit=True) state, whose blocks "
                         "follow each rank's shard and cannot be resharded; use eight_bit=False under FSDP2")
    return {key: row_shards(param, value) if key in row_keys else value for key, value in state.items()}


def row_shards(param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (this rank's block of a tensor laid out along ``param``'s rows) as a ``Shard(0)`` DTensor whose
    global shape has the whole weight's row count; ``rows`` itself for a plain parameter."""
    if not is_sharded(param):
        return rows
    from torch.distributed.tensor import DTensor, Shard

    shape = (int(param.shape[0]),) + tuple(rows.shape[1:])  # the whole weight's rows
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(rows, param.device_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
