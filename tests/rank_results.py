"""Run a gloo worker on every rank of a local process group and read back what each rank saved."""

from __future__ import annotations

from pathlib import Path

import torch

from velora.integrations.distributed import run_local


def run_ranks(worker, world: int, out_dir: Path, timeout_s: int) -> list[dict]:
    """``worker(rank, world, out_dir)`` saves ``{out_dir}/rank{rank}.pt``; returns those dicts in rank order."""
    run_local(worker, world, args=(str(out_dir),), timeout_s=timeout_s)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
