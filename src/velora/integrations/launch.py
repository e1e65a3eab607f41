"""A local multi-process launcher for tests, examples and debugging on one machine: ``run_local(fn, N)`` runs
``fn(process_rank, world_size, *args)`` in N spawned CPU processes joined by gloo, as ``torchrun --nproc_per_node N``
would, and turns a failing or hanging rank into one exception."""

from __future__ import annotations

import datetime
import gc
import os
import socket
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["run_local", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_worker(fn: Callable, process_rank: int, num_processes: int, port: int, timeout_s: float,
                  args: tuple, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(process_rank),
                      LOCAL_RANK=str(process_rank), WORLD_SIZE=str(num_processes))
    torch.set_num_threads(1)  # ranks share the machine's cores
    try:
        dist.init_process_group("gloo", rank=process_rank, world_size=num_processes,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            fn(process_rank, num_processes, *args)
            gc.collect()  # fn's DDP wrappers go before the group (see shutdown)
            dist.barrier()  # every rank done before any tears the group down
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put((process_rank, traceback.format_exc()))
        raise SystemExit(1) from None


def run_local(fn: Callable, num_processes: int = 2, args: tuple = (), timeout_s: float = 120.0) -> None:
    """Run ``fn(process_rank, world_size, *args)`` in ``num_processes`` spawned CPU processes joined by gloo on
    127.0.0.1 (a free port), like ``torchrun --nproc_per_node N`` would. Each process uses one thread.

    ``fn`` must be importable (a module-level function). Raises RuntimeError with the first failing rank's
    traceback, and TimeoutError (after killing every process) if the group does not finish within
    ``timeout_s`` seconds, so a hang fails instead of blocking forever. Process groups are always destroyed.
    """
    import multiprocessing
    import time

    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=_local_worker, args=(fn, process_rank, num_processes, port, timeout_s, args,
                                                                errors), daemon=True)
                 for process_rank in range(num_processes)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in processes):
            if any(p.exitcode not in (None, 0) for p in processes):
                break  # one rank failed: the others would wait in a collective until the timeout
            if time.monotonic() > deadline:
                name = getattr(fn, "__name__", fn)
                raise TimeoutError(f"run_local({name!r}) did not finish within {timeout_s:.0f} s; a rank hangs")
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        process_rank, trace = sorted(failures)[0]
        raise RuntimeError(f"rank {process_rank} of {num_processes} failed:\n{trace}")
    codes = [p.exitcode for p in processes]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"run_local processes exited with codes {codes}")
