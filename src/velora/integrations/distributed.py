"""torch.distributed helpers: process-group setup from the environment, VeLoRA state sync across
ranks, a FLoRA-compressed DDP communication hook, and a local multi-process launcher for tests.

What is synchronised where:
- **v (VeLoRA directions)** is a buffer. ``apply_velora`` layers all-reduce the first batch's mean
  sub-token across ranks inside their first training forward (``VeLoRAConfig.sync_across_ranks``),
  so every rank holds the same v from the very first backward, whether or not DDP broadcasts buffers
  (``broadcast_buffers=False`` included). ``broadcast_velora_state`` re-syncs a model whose ranks
  loaded different checkpoints; ``velora_state_in_sync`` checks it.
- **FLoRA projections** are regenerated from integer seeds (``velora.optim.projections``), never
  communicated: identical seeds give bit-identical matrices on every rank.
- **Gradients** go through DDP as usual, or through ``register_flora_comm_hook``, which all-reduces
  each 2-D gradient's seeded random projection (kept_dim × r instead of rows × cols; by default the
  smaller side is projected, as in FLoRA's accumulation) and decompresses after the all-reduce.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "init_from_env",
    "shutdown",
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "broadcast_velora_state",
    "velora_state_in_sync",
    "shard_indices",
    "wrap_ddp",
    "sync_context",
    "rank_batch_index",
    "mean_across_ranks",
    "main_process_first",
    "FloraCommState",
    "flora_comm_hook",
    "register_flora_comm_hook",
    "bucket_wire_bytes",
    "run_local",
    "free_port",
]


# ---- process group ---------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).

    Returns the device this rank should use: ``cuda:LOCAL_RANK`` with nccl when CUDA is available,
    else the CPU with gloo. Without torchrun's variables (a plain ``python`` run) nothing is initialised
    and the default device is returned. Calling it twice is harmless.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return device
    if not dist.is_available():
        raise ValueError("WORLD_SIZE>1 but this torch build has no torch.distributed; "
                         "install a torch with distributed support")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend={backend!r} is not supported; use 'gloo' (CPU) or 'nccl' (CUDA)")
    if backend == "nccl" and not cuda:
        raise ValueError("backend='nccl' needs CUDA; use backend='gloo' on CPU")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    """Leave the process group cleanly: collect garbage, wait for every rank, then destroy the group.

    Drop your ``DistributedDataParallel`` wrapper first (``del ddp``): destroying the group while a DDP
    reducer is alive, or while another rank is still inside a gloo call, intermittently aborts a rank at
    exit with "terminate called without an active exception" (about 1 run in 6 on this machine; 0 in 8
    with ``del ddp`` + this function)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP objects in reference cycles die now, not after the group
        dist.barrier()
        dist.destroy_process_group()


def shard_indices(num_items: int, shard: int | None = None, num_shards: int | None = None) -> range:
    """Items ``shard, shard + num_shards, ...`` of ``range(num_items)``, cut to an equal count on every shard
    (like DistributedSampler(drop_last=True) without shuffling), so per-rank batches stay equal-sized and
    the DDP mean equals the mean over the concatenated batch."""
    shard = rank() if shard is None else shard
    num_shards = world_size() if num_shards is None else num_shards
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} is outside [0, num_shards={num_shards})")
    per_shard = num_items // num_shards
    if per_shard == 0:
        raise ValueError(f"{num_items} items cannot be split over {num_shards} ranks; use more data or fewer ranks")
    return range(shard, per_shard * num_shards, num_shards)


def wrap_ddp(model: nn.Module, device: torch.device | None = None, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a multi-rank group, ``model`` itself otherwise.

    The model is moved to ``device`` first (``cuda:LOCAL_RANK`` from ``init_from_env``; then DDP also
    moves each forward's inputs there)."""
    if device is not None:
        model = model.to(device)
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device is not None and device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device])
    return DistributedDataParallel(model, **ddp_kwargs)


def sync_context(model: nn.Module, last_micro_batch: bool):
    """``model.no_sync()`` for a DDP model on every micro-batch but the last of an accumulation cycle
    (gradients accumulate locally and are all-reduced once); a null context otherwise."""
    import contextlib

    if last_micro_batch or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def rank_batch_index(index: int) -> int:
    """This rank's share of a global batch sequence: rank r of N takes batches r, N + r, 2N + r, ... of the
    single-process order (index unchanged in one process, so single-process runs are unaffected)."""
    return index * world_size() + rank()


def mean_across_ranks(value: float) -> float:
    """The mean of a Python number over the ranks (for logging); the number itself in one process."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor) / dist.get_world_size()


@contextmanager
def main_process_first():
    """Run the block on rank 0 first, then on the other ranks (e.g. building data caches once)."""
    distributed = is_distributed()
    if distributed and not is_main_process():
        dist.barrier()
    try:
        yield
    finally:
        if distributed and is_main_process():
            dist.barrier()


# ---- VeLoRA state across ranks ---------------------------------------------------------------------

_VELORA_BUFFERS = ("velora_v", "velora_initialised", "velora_running_mean")


def _velora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from velora.core.layers import velora_modules

    return velora_modules(model)


@torch.no_grad()
def broadcast_velora_state(model: nn.Module, src: int = 0) -> int:
    """Copy every VeLoRA layer's v / initialised flag / running mean from rank ``src`` to all ranks.

    Needed only when ranks hold different VeLoRA states (e.g. they loaded different checkpoints, or set
    ``sync_across_ranks=False`` and want to align later). All ranks must call it. Returns the number of
    layers synced (0 outside a multi-rank group).
    """
    if not is_distributed():
        return 0
    layers = _velora_layers(model)
    for layer in layers.values():
        for key in _VELORA_BUFFERS:
            if key in layer._buffers:
                buffer = layer._buffers[key]
                synced = buffer.contiguous().clone()
                dist.broadcast(synced, src=src)
                layer._buffers[key] = synced  # out of place: a pending backward keeps its saved v
        layer._velora_ready = bool(layer.velora_initialised)
    return len(layers)


@torch.no_grad()
def velora_state_in_sync(model: nn.Module) -> bool:
    """True when every rank holds bit-identical VeLoRA buffers (all ranks must call it)."""
    if not is_distributed():
        return True
    mismatches = torch.zeros((), dtype=torch.int64)
    for layer in _velora_layers(model).values():
        for key in _VELORA_BUFFERS:
            if key in layer._buffers:
                mine = layer._buffers[key].detach().to("cpu", torch.float64).reshape(-1)  # (numel,)
                reference = mine.clone()
                dist.broadcast(reference, src=0)
                mismatches += int(not torch.equal(mine, reference))
    dist.all_reduce(mismatches, op=dist.ReduceOp.SUM)
    return int(mismatches) == 0


# ---- FLoRA-compressed gradient all-reduce (a DDP communication hook) ---------------------------------


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
    ``Flora`` and ``CompressedGradAccumulator``, so one ``rank`` means one estimator everywhere) or
    "larger" (fewer bytes per rank). At equal bytes both have the same variance (it grows like
    projected side / r), so the side only decides what ``rank`` buys.

    With ``accumulator`` (a ``CompressedGradAccumulator``), the matrices it compresses are sent as the
    accumulator's own (k × r) sums instead (``accumulator_index``: ``id(parameter)`` -> its index there),
    on the accumulator's side.
    """

    rank: int
    seed: int = 0
    step: int = 0
    process_group: Any = None
    param_index: dict[int, int] = field(default_factory=dict)
    orthogonal: bool = False
    project: str = "smaller"
    wire_bytes: int = 0
    dense_bytes: int = 0
    accumulator: Any = None
    accumulator_index: dict[int, int] = field(default_factory=dict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64), "seed": torch.tensor(self.seed, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step, self.seed = int(state["step"]), int(state["seed"])


def _projection_for(state: FloraCommState, param_index: int, plan, device, dtype) -> torch.Tensor:
    from velora.optim.projections import derive_seed, random_projection

    seed = derive_seed(state.seed, param_index, state.step)
    return random_projection(seed, plan.projected_dim, plan.rank, device=device, dtype=dtype,
                             orthogonal=state.orthogonal)  # (r, projected_dim)


def _accumulator_projection(state: FloraCommState, index: int, device) -> tuple[Any, torch.Tensor]:
    """(plan, A) of the accumulation cycle that just ended for accumulator parameter ``index``."""
    from velora.optim.projections import random_projection

    accumulator = state.accumulator
    if not accumulator._in_last_micro_batch():
        raise ValueError("flora_comm_hook(accumulator=...) saw DDP synchronise in the middle of an accumulation "
                         "cycle; run every micro-batch but the last under ddp.no_sync() "
                         "(velora.integrations.distributed.sync_context) so gradients are all-reduced once per cycle")
    plan = accumulator.plans[index]
    cycle = int(accumulator.cycles[index])  # the cycle closes at the end of this backward
    # in the accumulator's own dtype (float64 buffers for float64 parameters)
    projection = random_projection(accumulator.seed_for(index, cycle), plan.projected_dim, plan.rank, device,
                                   accumulator.buffers[index].dtype, accumulator.orthogonal)  # (r, projected_dim)
    return plan, projection


def _recover_accumulated(grad: torch.Tensor, projection: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The accumulator left .grad = C·A (oriented); get its (k × r) sum C back: C = (G Aᵀ)(A Aᵀ)⁻¹."""
    oriented = (grad.t() if transposed else grad).to(projection.dtype)  # (k, p)
    gram = projection @ projection.t()  # (r, r), symmetric positive definite
    return torch.linalg.solve(gram, (oriented @ projection.t()).t()).t()  # (k, r)


def compress_gradient(grad: torch.Tensor, projection: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(rows, cols) -> (kept_dim, r): project the plan's projected side with A (r, projected_dim)."""
    oriented = grad.t() if transposed else grad  # (kept_dim, projected_dim)
    return oriented @ projection.t()  # (kept_dim, r)


def decompress_gradient(compressed: torch.Tensor, projection: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(kept_dim, r) -> (rows, cols): c·A, transposed back when the plan worked on the transpose."""
    restored = compressed @ projection  # (kept_dim, projected_dim)
    return restored.t() if transposed else restored


def flora_comm_hook(state: FloraCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce FLoRA-projected 2-D gradients instead of the full ones.

    Each projectable matrix's gradient G (rows × cols, ``rank`` below its projected side, by default
    the smaller one) is sent as its projection onto a seeded Gaussian A (r × projected side),
    kept_dim × r numbers; everything else (biases, norms, embeddings, the output head, small matrices)
    is sent as is. After the all-reduce each rank decompresses, so the gradient the optimizer sees is
    mean_ranks(G)·AᵀA (or AᵀA·mean(G) when the rows are the projected side). That equals
    all-reduce-then-compress-then-decompress exactly (by linearity) and is an **unbiased** estimate of
    the mean gradient (E[AᵀA] = I), with variance shrinking as r grows; at r = the projected side with
    ``orthogonal=True`` it is exact.
    """
    from velora.optim.projections import compression_plan

    group = state.process_group if state.process_group is not None else dist.group.WORLD
    group_size = dist.get_world_size(group)
    buffer = bucket.buffer()  # flat (numel,) view of every gradient in the bucket
    grads, params = bucket.gradients(), bucket.parameters()
    pieces: list[torch.Tensor] = []
    layout: list[tuple[torch.Tensor, Any, torch.Tensor | None, int]] = []  # (grad view, plan, A, numel sent)
    for grad, param in zip(grads, params):
        accumulated = state.accumulator_index.get(id(param))
        if accumulated is not None:  # send the accumulator's (k × r) sum: no second projection
            plan, projection = _accumulator_projection(state, accumulated, grad.device)
            compressed = _recover_accumulated(grad, projection, plan.transposed)  # (k, r)
            pieces.append(compressed.reshape(-1).to(grad.dtype))  # (k * r,)
            layout.append((grad, plan, projection, compressed.numel()))
            continue
        index = state.param_index.get(id(param))  # None: not a projectable matrix
        plan = compression_plan(grad.shape, state.rank, project=state.project) if index is not None else None
        if plan is None:
            pieces.append(grad.reshape(-1))  # (numel,)
            layout.append((grad, None, None, grad.numel()))
            continue
        work_dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
        projection = _projection_for(state, index, plan, grad.device, work_dtype)  # (r, projected_dim)
        compressed = compress_gradient(grad.to(work_dtype), projection, plan.transposed)  # (kept_dim, r)
        pieces.append(compressed.reshape(-1).to(grad.dtype))  # (kept_dim * r,)
        layout.append((grad, plan, projection, compressed.numel()))
    wire = torch.cat(pieces).div_(group_size)  # (sum of sent numels,), pre-divided like DDP's default hook
    state.wire_bytes += wire.numel() * wire.element_size()
    state.dense_bytes += buffer.numel() * buffer.element_size()
    if bucket.is_last():
        state.step += 1  # the next backward draws fresh projections

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]  # (sum of sent numels,)
        offset = 0
        for grad, plan, projection, numel in layout:
            chunk = reduced[offset:offset + numel]
            offset += numel
            if plan is None:
                grad.copy_(chunk.view_as(grad))
            else:
                compressed = chunk.view(plan.kept_dim, plan.rank).to(projection.dtype)  # (kept_dim, r)
                grad.copy_(decompress_gradient(compressed, projection, plan.transposed))  # (rows, cols)
        return buffer

    return dist.all_reduce(wire, group=group, async_op=True).get_future().then(decompress)


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
    the last micro-batch. Its matrices are then sent as the accumulator's own (k × r) sums, recovered
    exactly from the decompressed ``.grad`` (C = G·Aᵀ(AAᵀ)⁻¹), all-reduced, and decompressed with the
    same A: the result is decompress(mean over ranks of C), i.e. exactly the single-process FLoRA
    accumulation on the concatenated batch, with no second projection and its extra variance.
    """
    from torch.nn.parallel import DistributedDataParallel

    from velora.optim.projections import check_project_side, projectable_parameters

    if not isinstance(ddp_model, DistributedDataParallel):
        raise ValueError(f"register_flora_comm_hook needs a DistributedDataParallel model, got "
                         f"{type(ddp_model).__name__}; wrap it with DDP(model) first")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive integer (the FLoRA projection rank)")
    check_project_side(project)
    compressible = {id(p) for p in projectable_parameters(ddp_model.module)}
    index = {id(p): i for i, p in enumerate(ddp_model.module.parameters()) if id(p) in compressible}
    state = FloraCommState(rank=rank, seed=seed, process_group=process_group, param_index=index,
                           orthogonal=orthogonal, project=project)
    if accumulator is not None:
        state.accumulator = accumulator
        state.accumulator_index = {id(p): i for i, (p, plan) in enumerate(zip(accumulator.params, accumulator.plans))
                                   if plan is not None}
    ddp_model.register_comm_hook(state, flora_comm_hook)
    return state


def bucket_wire_bytes(model: nn.Module, rank: int | None, dtype: torch.dtype | None = None,
                      project: str = "smaller") -> int:
    """Bytes one rank all-reduces per step for ``model``'s trainable parameters: plain DDP
    (``rank=None``) or ``flora_comm_hook`` at projection rank ``rank`` projecting the ``project`` side.
    Pure arithmetic, no process group."""
    from velora.optim.projections import compression_plan, projectable_parameters

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


# ---- a local multi-process launcher (tests, examples, debugging on one machine) -----------------------


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
    """Run ``fn(rank, world_size, *args)`` in ``num_processes`` spawned CPU processes joined by gloo on
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
    processes = [context.Process(target=_local_worker, args=(fn, r, num_processes, port, timeout_s, args, errors),
                                 daemon=True) for r in range(num_processes)]
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
