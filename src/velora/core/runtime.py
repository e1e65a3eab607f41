"""Rules every layer of the library asks the same way, written once: the precision a computation runs in for a given
input dtype, and whether this process is one rank of several. Depends on torch only, so core, optim, memory and
integrations can all import it."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["HALF_DTYPES", "work_dtype", "state_dtype", "is_distributed"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a projection, statistic or update is computed in: float32 for 16-bit inputs (their sums and
    products lose digits), the input's own dtype otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a kept state (moments, accumulated sums, projectors) is stored in: float64 for float64 inputs,
    float32 for everything narrower (a wider input is never kept below its own precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
