"""Run a gloo worker on every rank of a local process group and read back what each rank saved; and run such an
expensive producer once per test session even when pytest-xdist spreads its callers over several workers.

Every test module's 2-rank gloo worker runs in one spawn per session (``gloo_ranks``): starting a rank costs more
CPU than most of the workers' own scenarios (a fresh interpreter importing torch and the test module), so one
spawn running the modules' workers in turn replaces one spawn per module."""

from __future__ import annotations

import fcntl
import importlib
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


def read_ranks(out_dir: Path, world: int) -> list[dict]:
    """The ``{out_dir}/rank{rank}.pt`` dict each rank's worker saved, in rank order."""
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


# module -> its rank worker ``fn(rank, world, out_dir)``, run in this order in the session's one spawn
GLOO_WORKERS = {"test_core_reliability": "_zero_token_ranks_worker", "test_distributed_optim": "_worker",
                "test_distributed": "_ranks_worker", "test_fsdp2_optim": "_worker"}
GLOO_WORLD = 2


def _every_module_worker(rank: int, world: int, out_dir: str) -> None:
    for module, name in GLOO_WORKERS.items():
        folder = Path(out_dir) / module
        folder.mkdir(exist_ok=True)
        getattr(importlib.import_module(module), name)(rank, world, str(folder))


def gloo_ranks(tmp_path_factory, module: str) -> list[dict]:
    """What each rank of the session's one 2-rank gloo spawn saved for ``module`` (its GLOO_WORKERS entry)."""
    if module not in GLOO_WORKERS:
        raise KeyError(f"{module} has no rank worker in GLOO_WORKERS; add it there")
    folder = once_per_session(tmp_path_factory, "gloo", lambda out: run_local(
        _every_module_worker, GLOO_WORLD, args=(str(out),), timeout_s=600))
    return read_ranks(folder / module, GLOO_WORLD)
