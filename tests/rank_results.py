"""Run a gloo worker on every rank of a local process group and read back what each rank saved; and run such an
expensive producer once per test session even when pytest-xdist spreads its callers over several workers."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from velora.integrations.distributed import run_local


def once_per_session(tmp_path_factory, name: str, produce: Callable[[Path], None]) -> Path:
    """``produce(folder)`` runs once for the whole session and its folder is shared: under pytest-xdist every
    worker has its own module-scoped fixtures, so a 2-rank spawn (15-25 s of CPU) would run once per worker that
    gets one of the module's tests. The first caller runs it under an exclusive file lock in the session's common
    temp folder; later callers wait for the lock and reuse the folder. A failed run leaves no ``done`` mark, so
    the next caller runs it again (and fails the same way)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base temps are popen-gw<N> folders inside one session folder
    folder = root / f"once-{name}"
    with open(root / f"once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            produce(folder)
            (folder / "done").touch()
    return folder


def run_ranks(worker, world: int, out_dir: Path, timeout_s: int) -> list[dict]:
    """``worker(rank, world, out_dir)`` saves ``{out_dir}/rank{rank}.pt``; returns those dicts in rank order."""
    run_local(worker, world, args=(str(out_dir),), timeout_s=timeout_s)
    return read_ranks(out_dir, world)


def read_ranks(out_dir: Path, world: int) -> list[dict]:
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


def run_ranks_once(worker, world: int, tmp_path_factory, name: str, timeout_s: int) -> list[dict]:
    """``run_ranks`` once per session (``once_per_session``), whichever xdist worker asks first."""
    folder = once_per_session(tmp_path_factory, name,
                              lambda out: run_local(worker, world, args=(str(out),), timeout_s=timeout_s))
    return read_ranks(folder, world)
