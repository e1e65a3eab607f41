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

What marks the boundary: each parameter's ``accumulation_steps``-th gradient. Right after the
``backward()`` of the last micro-batch of a cycle every ``.grad`` holds the decompressed sum (or mean),
so any ``optimizer.step()``, gradient clipping, the HF Trainer and accelerate work unchanged: they
step exactly when they would with plain accumulation. Nothing is stepped per micro-batch. Call
``flush()`` to end a partial cycle early (e.g. the last batches of an epoch).

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

import torch
from torch import nn

from velora.optim.projections import (
    CompressionPlan,
    check_project_side,
    compression_plan,
    derive_seed,
    projectable_parameters,
    random_projection,
    saved_project_side,
)

__all__ = ["CompressedGradAccumulator"]

_SALT = 0xACC  # keeps accumulation projections independent of Flora momentum projections


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
        self.plans: list[CompressionPlan | None] = [
            compression_plan(p.shape, rank, force_compress, project) if id(p) in candidates else None
            for p in self.params
        ]
        # float32 sums (float64 for float64 parameters: no precision is lost to the buffer)
        self.buffers: list[torch.Tensor | None] = [
            None if plan is None else torch.zeros(plan.kept_dim, plan.rank, dtype=_buffer_dtype(p), device=p.device)
            for p, plan in zip(self.params, self.plans)
        ]  # (k, r) each
        self.counts = torch.zeros(len(self.params), dtype=torch.int64)  # micro-batches in the open cycle
        self.cycles = torch.zeros(len(self.params), dtype=torch.int64)  # completed cycles per parameter
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
        return random_projection(self.seed_for(param_index, int(self.cycles[param_index])), plan.projected_dim,
                                 plan.rank, self.params[param_index].device, _buffer_dtype(self.params[param_index]),
                                 self.orthogonal)

    @property
    def cycle_complete(self) -> bool:
        """True when no micro-batch is pending: every ``.grad`` is either None or decompressed."""
        return bool((self.counts == 0).all())

    def flush(self) -> None:
        """End the open cycle now: write the decompressed partial sums (or means) into ``.grad``."""
        with torch.no_grad():
            for index, param in enumerate(self.params):
                count = int(self.counts[index])
                if count == 0:
                    continue
                if self.plans[index] is None:
                    if self.reduction == "mean" and param.grad is not None:
                        param.grad.div_(count)
                else:
                    param.grad = self._decompress(index, count).to(param.dtype)
                    self.buffers[index].zero_()
                self.counts[index] = 0
                self.cycles[index] += 1

    def buffer_bytes(self) -> int:
        """Bytes held by the compressed accumulation buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers if b is not None)

    def naive_buffer_bytes(self) -> int:
        """Bytes plain accumulation would hold for the same (compressed) parameters' gradients."""
        return sum(p.numel() * p.element_size() for p, plan in zip(self.params, self.plans) if plan is not None)

    def state_dict(self) -> dict:
        """Tensors only (loads with ``torch.load(weights_only=True)``); includes the partial ``.grad``
        of uncompressed parameters so a resume in the middle of a cycle is exact."""
        return {
            "rank": self.rank,
            "accumulation_steps": self.accumulation_steps,
            "seed": self.seed,
            "project": self.project,
            "orthogonal": self.orthogonal,
            "counts": self.counts.clone(),
            "cycles": self.cycles.clone(),
            "buffers": {i: b.clone() for i, b in enumerate(self.buffers) if b is not None},
            "plain_grads": {
                i: p.grad.detach().clone()
                for i, (p, plan) in enumerate(zip(self.params, self.plans))
                if plan is None and p.grad is not None and int(self.counts[i]) > 0
            },
        }

    def load_state_dict(self, state: dict) -> None:
        saved_project_side(state.get("project"), self.project, "CompressedGradAccumulator")
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
        self.counts.copy_(state["counts"])
        self.cycles.copy_(state["cycles"])
        for index, buffer in state["buffers"].items():
            self.buffers[int(index)].copy_(buffer)
        for index, grad in state["plain_grads"].items():
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
        full = self.buffers[index] @ projection  # (k, r) @ (r, p) -> (k, p)
        if self.reduction == "mean":
            full.div_(count)
        return full.T if plan.transposed else full

    def _make_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                self._on_gradient(index, param)

        return hook

    def _on_gradient(self, index: int, param: torch.Tensor) -> None:
        self.counts[index] += 1
        count = int(self.counts[index])
        boundary = count >= self.accumulation_steps
        plan = self.plans[index]
        if plan is None:  # plain accumulation in .grad
            if boundary:
                if self.reduction == "mean":
                    param.grad.div_(count)
                self.counts[index] = 0
                self.cycles[index] += 1
            return
        grad = param.grad.to(self.buffers[index].dtype)
        oriented = grad.T if plan.transposed else grad  # (k, p)
        projection = self.projection(index)  # (r, p)
        self.buffers[index].add_(oriented @ projection.T)  # (k, r)
        if not boundary:
            param.grad = None  # free the full gradient until the boundary
            return
        full = self._decompress(index, count, projection)  # (n, m), the same projection: one regeneration less
        param.grad.copy_(full)  # reuse the gradient's memory for the decompressed sum
        self.buffers[index].zero_()
        self.counts[index] = 0
        self.cycles[index] += 1


def _buffer_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


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
    return params, candidates
