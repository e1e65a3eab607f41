"""FLoRA compressed gradient accumulation (Hao et al. 2024, Alg. 1).

Plain accumulation keeps one full gradient buffer per parameter (n x m). Here every 2-D gradient is
compressed as soon as autograd has accumulated it (a post-accumulate-grad hook), its full ``.grad``
is freed, and only C (k, r) is kept. G is taken in the orientation (k, p) where p is the projected
side: by default the smaller one (``project="smaller"``, k = max(n, m), as the FLoRA reference code does; the
decompression noise grows like sqrt(p / r)), or the larger one (``project="larger"``, k = min(n, m):
a smaller buffer, more noise):

    micro-batch 1..tau-1:  C <- C + G @ A.T ;  param.grad = None          # (k, r)
    micro-batch tau:       C <- C + G @ A.T ;  param.grad <- C @ A          # decompressed, in place
                           C <- 0 ; next cycle uses a new projection A

What marks the boundary: the number of micro-batches, one per ``backward()`` that reaches any tracked
parameter (counted by a callback queued on that backward, so a parameter that receives no gradient in a
micro-batch -- a conditional layer, an MoE expert without tokens, another task's head -- moves nothing).
In the ``accumulation_steps``-th backward each arriving parameter's hook decompresses its sum into ``.grad``
(before DDP reads it); at the end of that backward the sums of parameters that skipped it are decompressed
too, and parameters that received nothing in the whole cycle keep ``.grad = None``: exactly what plain
accumulation leaves. So right after the ``backward()`` of the last micro-batch of a cycle any
``optimizer.step()``, gradient clipping, the HF Trainer and accelerate work unchanged. Nothing is stepped
per micro-batch. Call ``flush()`` to end a partial cycle early (e.g. the last batches of an epoch).

Which parameters are compressed: given a model, its attention/MLP matrices
(``projections.projectable_parameters``; embeddings and the output head stay plain), given a
parameter list, every 2-D tensor; in both cases only if ``rank`` is below the projected side
(``projections.compression_plan``: the buffer (k, r) must be smaller than the gradient). The others
accumulate in ``.grad`` as usual.
The projection of parameter i in cycle c is ``random_projection(seed_for(i, c), ...)``, regenerated from its
seed at every micro-batch (nothing of size p x r is kept). Its rows are orthonormal, scaled by sqrt(p / r)
(``orthogonal=True``, our default), or Gaussian with entries N(0, 1/r) as in the paper (``orthogonal=False``).
Both give an unbiased sum, E[A.T @ A] = I; the orthonormal one misses it by (p / r - 1) ||G||^2 in
expectation instead of (p + 1) / r ||G||^2, for every G, with the same buffer (docs/optim.md), at the cost of
a p x r QR each time the projection is regenerated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.autograd import Variable

from velora.core.runtime import is_distributed, state_dtype
from velora.optim.projections import (
    CompressionPlan,
    check_project_side,
    compress,
    compression_plan,
    decompress,
    derive_seed,
    projectable_parameters,
    random_projection,
    saved_project_side,
)
from velora.optim.sharded import check_row_sharded, column_plan, is_sharded, like, local, local_plan, row_shards

__all__ = ["CompressedGradAccumulator", "CompressedGrad"]

_SALT = 0xACC  # keeps accumulation projections independent of Flora momentum projections


class CompressedGrad(NamedTuple):
    """A parameter's gradient in compressed form: ``decompress(compressed, projection, plan.transposed)`` (n, m)."""

    plan: CompressionPlan
    compressed: torch.Tensor  # (k, r)
    projection: torch.Tensor  # (r, p)


class CompressedGradAccumulator:
    """Compress gradients across ``accumulation_steps`` micro-batches into (k x rank) buffers.

    Args:
        model_or_params: an ``nn.Module`` (its parameters with ``requires_grad``) or an iterable of
            parameters / param-group dicts.
        rank: projection rank r.
        accumulation_steps: micro-batches per optimizer step (tau).
        seed: base seed of the projections.
        reduction: "sum" (default: exactly what plain accumulation leaves in ``.grad``) or "mean".
        orthogonal: orthonormal projection rows (default: less reconstruction error than the paper's Gaussian
            at every rank, exact when rank == the projected dimension); False draws the paper's Gaussian rows.
        project: which side of each matrix is projected, "smaller" (default, as the FLoRA reference code: less
            noise) or "larger" (a min(n, m) x rank buffer: less memory, more noise).
        force_compress: compress every 2-D parameter, even when it saves nothing (for tests).
    """

    def __init__(
        self,
        model_or_params,
        rank: int,
        accumulation_steps: int,
        seed: int = 0,
        *,
        reduction: str = "sum",
        orthogonal: bool = True,
        project: str = "smaller",
        force_compress: bool = False,
    ):
        for name, value in (("rank", rank), ("accumulation_steps", accumulation_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CompressedGradAccumulator: {name}={value!r} must be a positive integer")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"CompressedGradAccumulator: reduction={reduction!r} must be 'sum' or 'mean'")
        check_project_side(project)
        self.params, candidates = _collect_params(model_or_params)
        self.rank, self.accumulation_steps, self.seed = rank, accumulation_steps, int(seed)
        self.reduction, self.orthogonal, self.project = reduction, orthogonal, project
        self._candidates, self._force_compress = candidates, force_compress
        self._set_plans(_plan)
        self._index_of = {id(p): index for index, p in enumerate(self.params)}
        self.counts = torch.zeros(len(self.params), dtype=torch.int64)  # gradients received in the open cycle
        self.cycles = torch.zeros(len(self.params), dtype=torch.int64)  # completed cycles (the same for all)
        self.micro_batches = torch.zeros((), dtype=torch.int64)  # backward passes counted in the open cycle
        self._closed: set[int] = set()  # parameters whose sum was written into .grad in this last backward
        self._counted_tasks: set[int] = set()  # autograd graph tasks whose end is already awaited
        self._handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(index)) for index, p in enumerate(self.params)
        ]

    # --- public API -----------------------------------------------------------------------------------

    def seed_for(self, param_index: int, cycle: int) -> int:
        """Seed of the projection of parameter ``param_index`` during accumulation cycle ``cycle``."""
        return derive_seed(self.seed, param_index, cycle, _SALT)

    def projection(self, param_index: int) -> torch.Tensor:
        """The (r, p) projection parameter ``param_index`` uses in its current cycle."""
        plan = self.plans[param_index]
        if plan is None:
            shape = tuple(self.params[param_index].shape)
            raise ValueError(f"parameter {param_index} of shape {shape} is not compressed; it has no projection")
        param = self.params[param_index]
        seed = self.seed_for(param_index, int(self.cycles[param_index]))
        return random_projection(seed, plan.projected_dim, plan.rank, param.device, state_dtype(param.dtype),
                                 self.orthogonal)  # (r, p)

    @property
    def cycle_complete(self) -> bool:
        """True when no micro-batch is pending: every ``.grad`` is either None or decompressed."""
        return int(self.micro_batches) == 0

    def compresses(self, param: torch.Tensor) -> bool:
        """True when ``param``'s gradient is accumulated in a compressed (k, r) buffer here."""
        index = self._index_of.get(id(param))
        return index is not None and self.plans[index] is not None

    def compressed_grad(self, param: torch.Tensor) -> CompressedGrad:
        """For a DDP communication hook during the backward of a cycle's last micro-batch: ``param``'s gradient as
        the (k, r) sum (divided by the micro-batch count for ``reduction="mean"``) and projection whose
        decompression the accumulator has just written into ``.grad``. All-reducing the (k, r) sum instead of
        ``.grad`` sends k x r numbers and adds no second projection."""
        if not self.compresses(param):
            raise ValueError(f"a parameter of shape {tuple(param.shape)} is not compressed by this accumulator; "
                             "check compresses(param) first and send its .grad as it is")
        if not self._in_last_micro_batch():
            raise ValueError("a communication hook asked for a compressed gradient in the middle of an accumulation "
                             "cycle; run every micro-batch but the last under ddp.no_sync() "
                             "(velora.integrations.distributed.sync_context) so gradients are all-reduced once per "
                             "cycle")
        # a parameter that skipped this micro-batch is refused in one line when the backward ends (_close_cycle)
        index = self._index_of[id(param)]
        summed = self.buffers[index]  # (k, r); a copy goes out: the buffer is zeroed when the backward ends
        compressed = summed / self.accumulation_steps if self.reduction == "mean" else summed.clone()
        return CompressedGrad(self.plans[index], compressed, self.projection(index))

    def flush(self) -> None:
        """End the open cycle now: write the decompressed partial sums (or means) into ``.grad``."""
        if int(self.micro_batches) > 0:
            self._close_cycle(int(self.micro_batches))

    def buffer_bytes(self) -> int:
        """Bytes held by the compressed accumulation buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers if b is not None)

    def naive_buffer_bytes(self) -> int:
        """Bytes plain accumulation would hold for the same (compressed) parameters' gradients."""
        return sum(p.numel() * p.element_size() for p, plan in zip(self.params, self.plans) if plan is not None)

    def state_dict(self) -> dict:
        """Tensors only (loads with ``torch.load(weights_only=True)``); includes the partial ``.grad``
        of uncompressed parameters so a resume in the middle of a cycle is exact. Under FSDP2 the layout is the
        one ``torch.distributed.checkpoint`` saves and reshards (``_sharded_state_dict``)."""
        if any(is_sharded(p) for p in self.params):
            return self._sharded_state_dict()
        return {
            "rank": self.rank,
            "accumulation_steps": self.accumulation_steps,
            "seed": self.seed,
            "project": self.project,
            "orthogonal": self.orthogonal,
            "reduction": self.reduction,
            "counts": self.counts.clone(),
            "cycles": self.cycles.clone(),
            "micro_batches": self.micro_batches.clone(),
            "buffers": {i: b.clone() for i, b in enumerate(self.buffers) if b is not None},
            "plain_grads": {
                i: p.grad.detach().clone()
                for i, (p, plan) in enumerate(zip(self.params, self.plans))
                if plan is None and p.grad is not None and int(self.counts[i]) > 0
            },
        }

    def _sharded_state_dict(self) -> dict:
        """The FSDP2 layout: each (rows, r) sum as a ``Shard(0)`` DTensor of the weight's whole row count, and a
        gradient (zeros when there is none) for every uncompressed parameter with ``plain_grad_held`` saying which
        are real: the same keys on every rank and in every state, as DCP loads into a template.
        ``projected_columns`` records that every matrix projected its columns (``optim.sharded``), so a single
        process that loads the state keeps those sides."""
        held = torch.tensor([plan is None and p.grad is not None and int(self.counts[i]) > 0
                             for i, (p, plan) in enumerate(zip(self.params, self.plans))], dtype=torch.bool)
        state = {key: getattr(self, key) for key in ("rank", "accumulation_steps", "seed", "project", "orthogonal",
                                                      "reduction")}
        state.update(counts=self.counts.clone(), cycles=self.cycles.clone(), micro_batches=self.micro_batches.clone(),
                     plain_grad_held=held, projected_columns=True)
        state["buffers"] = {str(i): row_shards(p, b.clone()) for i, (p, b) in enumerate(zip(self.params, self.buffers))
                            if b is not None}
        state["plain_grads"] = {str(i): p.grad.detach().clone() if held[i] else torch.zeros_like(p.detach())
                                for i, (p, plan) in enumerate(zip(self.params, self.plans)) if plan is None}
        return state

    def load_state_dict(self, state: dict) -> None:
        _check_accumulator_state(state)
        saved_project_side(state.get("project"), self.project, "CompressedGradAccumulator")
        if state.get("reduction", self.reduction) != self.reduction:  # older states did not record it
            raise ValueError(f"state_dict was built with reduction={state['reduction']!r} but this accumulator has "
                             f"reduction={self.reduction!r}; build it with reduction={state['reduction']!r}")
        for key in ("rank", "accumulation_steps", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state[key]} but this accumulator has "
                                 f"{key}={getattr(self, key)}; build it with the same arguments")
        if state["counts"].numel() != len(self.params):
            raise ValueError(f"state_dict tracks {state['counts'].numel()} parameters, this accumulator "
                             f"{len(self.params)}; pass the same model/parameters")
        # the open sums can only be decompressed with the projection kind that compressed them; a state saved
        # before the kind was recorded is accepted only between cycles, where the sums are empty
        saved = state.get("orthogonal")
        if saved is None and bool((state["counts"] != 0).any()):
            raise ValueError("state_dict holds an open accumulation cycle but does not record its projection kind "
                             "(saved by an older version); resume from a checkpoint taken at a cycle boundary")
        if saved is not None and saved != self.orthogonal:
            raise ValueError(f"state_dict was built with orthogonal={saved} but this accumulator has "
                             f"orthogonal={self.orthogonal}; build it with orthogonal={saved}")
        if state.get("projected_columns") and not any(is_sharded(p) for p in self.params):
            self._set_plans(lambda p, *args: column_plan(p.shape, *args))  # keep the sides the FSDP2 run projected
        self.counts.copy_(state["counts"])
        self.cycles.copy_(state["cycles"])
        # older states counted per parameter (every parameter arrived in every micro-batch)
        self.micro_batches.fill_(int(state.get("micro_batches", state["counts"].max() if len(state["counts"]) else 0)))
        for index, buffer in state["buffers"].items():
            self.buffers[int(index)].copy_(local(buffer))  # FSDP2 (DCP): this rank's rows
        held = state.get("plain_grad_held")  # the FSDP2 layout saves zeros for the gradients it does not hold
        for index, grad in state["plain_grads"].items():
            if held is None or bool(held[int(index)]):
                param = self.params[int(index)]
                param.grad = grad.to(device=param.device, dtype=param.dtype).clone()

    def remove(self) -> None:
        """Uninstall the hooks (buffers are kept; gradients accumulate plainly afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> CompressedGradAccumulator:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- internals ------------------------------------------------------------------------------------

    def _decompress(self, index: int, count: int, projection: torch.Tensor | None = None) -> torch.Tensor:
        plan = self.plans[index]
        if projection is None:
            projection = self.projection(index)  # (r, p)
        full = decompress(self.buffers[index], projection, plan.transposed)  # (k, r) @ (r, p) -> (n, m)
        if self.reduction == "mean":
            full.div_(count)
        return full

    def _set_plans(self, plan_of) -> None:
        """The compression plan of every tracked parameter from ``plan_of`` and its zeroed (k, r) sum."""
        self.plans: list[CompressionPlan | None] = [
            plan_of(p, self.rank, self._force_compress, self.project) if id(p) in self._candidates else None
            for p in self.params
        ]
        # float32 sums (float64 for float64 parameters: no precision is lost to the buffer)
        self.buffers: list[torch.Tensor | None] = [
            None if plan is None else torch.zeros(plan.kept_dim, plan.rank, dtype=state_dtype(p.dtype), device=p.device)
            for p, plan in zip(self.params, self.plans)
        ]  # (k, r) each

    def _make_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                self._on_gradient(index, param)

        return hook

    def _await_end_of_backward(self) -> None:
        """Queue ``_end_of_backward`` once per autograd graph task (the first tracked gradient of it)."""
        task = torch._C._current_graph_task_id()
        if task not in self._counted_tasks:
            self._counted_tasks.add(task)
            Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._counted_tasks.discard(torch._C._current_graph_task_id())
        outer = torch._C._current_autograd_node()
        if outer is not None:  # a nested backward (reentrant checkpointing): count the outer one instead
            outer.register_hook(lambda *_: self._await_end_of_backward())
            return
        self.micro_batches += 1
        if int(self.micro_batches) >= self.accumulation_steps:
            self._close_cycle(int(self.micro_batches))

    def _in_last_micro_batch(self) -> bool:
        # >=: the HF Trainer may shorten accumulation_steps for the last cycle of an epoch
        return int(self.micro_batches) >= self.accumulation_steps - 1

    def _on_gradient(self, index: int, param: torch.Tensor) -> None:
        plan = self.plans[index]
        if plan is not None and param.grad.is_sparse:  # a projection of a sparse matrix has no sparse form
            raise ValueError(f"CompressedGradAccumulator: compressed parameter {index} of shape "
                             f"{tuple(param.shape)} got a sparse gradient; use nn.Embedding(sparse=False) or leave "
                             "it out of the compressed parameters")
        self._await_end_of_backward()
        self.counts[index] += 1
        last = self._in_last_micro_batch()
        if plan is None:  # plain accumulation in .grad
            if last:  # divided before DDP reads .grad
                if self.reduction == "mean":
                    param.grad.div_(self.accumulation_steps)
                self._closed.add(index)
            return
        grad = local(param.grad).to(self.buffers[index].dtype)  # FSDP2: this rank's rows of the reduced gradient
        projection = self.projection(index)  # (r, p)
        self.buffers[index].add_(compress(grad, projection, plan.transposed))  # (k, r)
        if not last:
            param.grad = None  # free the full gradient until the boundary
            return
        full = self._decompress(index, self.accumulation_steps, projection)  # (n, m), the same projection
        local(param.grad).copy_(full)  # reuse the gradient's memory for the decompressed sum
        self._closed.add(index)  # the sum stays in its buffer until the backward ends, for compressed_grad()

    def _refuse_local_sums(self, skipped: list[int]) -> None:
        """Under DDP only what is in .grad during the last micro-batch is all-reduced: a compressed sum (or a
        mean still to divide) of a parameter that skipped it would stay local, so refuse it."""
        local = [i for i in skipped if self.plans[i] is not None or self.reduction == "mean"]
        if local:
            self._empty_cycle()
            param = self.params[local[0]]
            raise ValueError(f"CompressedGradAccumulator: parameter {local[0]} of shape {tuple(param.shape)} got "
                             "gradients earlier in the cycle but none in its last micro-batch, the one DDP "
                             "all-reduces, so its sum would stay local; make every parameter take part in the last "
                             "micro-batch of a cycle (e.g. a zero-weighted term) or leave it out of the accumulator")

    def _close_cycle(self, micro_batches: int) -> None:
        """Write the sums of the parameters not yet closed into ``.grad``; start the next cycle."""
        skipped = [i for i in range(len(self.params)) if int(self.counts[i]) > 0 and i not in self._closed]
        if micro_batches >= self.accumulation_steps and is_distributed():  # not flush(): never all-reduced
            self._refuse_local_sums(skipped)
        with torch.no_grad():
            for index in skipped:
                param = self.params[index]
                if self.plans[index] is None:
                    if self.reduction == "mean" and param.grad is not None:
                        param.grad.div_(micro_batches)
                    continue
                full = self._decompress(index, micro_batches)  # (n, m)
                if param.grad is None:
                    param.grad = like(param, full.to(param.dtype))
                else:  # a .grad left by the user (e.g. zero_grad(set_to_none=False)) is added to, as autograd does
                    local(param.grad).add_(full.to(param.dtype))
        self._empty_cycle()
        self.cycles += 1

    def _empty_cycle(self) -> None:
        """Zero the sums of the open cycle (every parameter that received a gradient in it) and its counters."""
        with torch.no_grad():
            for index in self.counts.nonzero().flatten().tolist():
                if self.buffers[index] is not None:
                    self.buffers[index].zero_()
        self._closed.clear()
        self.counts.zero_()
        self.micro_batches.zero_()


_STATE_KEYS = ("rank", "accumulation_steps", "seed", "counts", "cycles", "buffers", "plain_grads")


def _check_accumulator_state(state) -> None:
    """One line for something that is not an accumulator state (an optimizer's state_dict, say)."""
    if isinstance(state, dict) and all(key in state for key in _STATE_KEYS):
        return
    if isinstance(state, dict) and "param_groups" in state:
        raise ValueError("CompressedGradAccumulator.load_state_dict got an optimizer state_dict (it has "
                         "'param_groups'); load that into the optimizer and pass acc.state_dict() here")
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"CompressedGradAccumulator.load_state_dict got {keys}, not an accumulator state (needs "
                     f"{list(_STATE_KEYS)}); pass what CompressedGradAccumulator.state_dict() returned")


def _plan(param: torch.Tensor, projection_rank: int, force: bool, project: str) -> CompressionPlan | None:
    """The compression plan of ``param`` for this rank's rows: under FSDP2 the columns are projected so each row
    shard compresses on its own, with no gather (``optim.sharded``)."""
    if not is_sharded(param):
        return compression_plan(param.shape, projection_rank, force, project)
    return local_plan(column_plan(param.shape, projection_rank, force, project), local(param).shape[0])


def _collect_params(model_or_params) -> tuple[list[torch.Tensor], set[int]]:
    """(parameters to track, ids of those that may be compressed)."""
    if isinstance(model_or_params, nn.Module):
        params = [p for p in model_or_params.parameters() if p.requires_grad]
        candidates = {id(p) for p in projectable_parameters(model_or_params)}
    else:
        params = []
        for item in model_or_params:
            params.extend(item["params"] if isinstance(item, dict) else [item])
        candidates = {id(p) for p in params}
    if not params:
        raise ValueError("CompressedGradAccumulator: got no trainable parameters; pass a model or parameters "
                         "with requires_grad=True")
    for param in params:
        if not isinstance(param, torch.Tensor) or not param.is_floating_point():
            raise ValueError("CompressedGradAccumulator: got a non-floating parameter; only floating-point "
                             "tensors carry gradients")
        check_row_sharded("CompressedGradAccumulator", param)
    return params, candidates
