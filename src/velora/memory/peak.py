"""Whole-step peak memory by category, on real CPU/CUDA tensors or under ``FakeTensorMode``.

A ``TorchDispatchMode`` sees every tensor an op returns. Each new untyped storage is recorded with its
byte size and dropped again when it dies (``weakref.finalize`` on the storage, which torch keeps as the
same Python object for the storage's whole life). The running sum of live storages is what a caching
allocator's ``max_memory_allocated`` counts, minus kernel-internal scratch buffers that never surface
as tensors. Fake tensors carry real (meta) storages with real sizes, so the same code predicts the
peak of a step nobody can afford to run.

Categories are decided after the fact: whenever the live sum reaches a new peak we keep the list of
live storages, and when the step is over we label them (model parameters and buffers, ``.grad``
tensors, optimizer state, tensors saved for backward, everything else = temporaries).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")
# a storage can wear several labels over its life; the first one in this order wins
_PRIORITY = {name: rank for rank, name in enumerate(CATEGORIES)}


@dataclass
class PeakReport:
    """Peak of the last measured training step and what was alive at that moment (bytes)."""

    peak_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    cuda_max_memory_allocated: int | None = None
    steps: int = 2
    # most bytes saved for backward alive at once during the measured step (what SavedActivationMeter
    # reports after the forward), whether or not that moment is the peak
    saved_activations_max: int = 0

    def report(self) -> str:
        width = max(len(name) for name in CATEGORIES)
        lines = [f"{'category':<{width}}  {'GiB':>9}  {'share':>6}"]
        for name in CATEGORIES:
            nbytes = self.breakdown.get(name, 0)
            share = nbytes / self.peak_bytes if self.peak_bytes else 0.0
            lines.append(f"{name:<{width}}  {nbytes / 2**30:9.3f}  {share:6.1%}")
        lines.append(f"{'peak':<{width}}  {self.peak_bytes / 2**30:9.3f}")
        if self.cuda_max_memory_allocated is not None:
            lines.append(f"{'cuda max alloc':<{width}}  {self.cuda_max_memory_allocated / 2**30:9.3f}")
        return "\n".join(lines)


# Ops whose boolean answer code expects to be True on healthy data (``if not torch.isfinite(x).all()``);
# any other boolean (``if (x < 0).any()``, ``if norm == 0``) is answered False: guards stay quiet.
_TRUTHY_OPS = {"all", "isfinite", "allclose", "equal"}


def _fake_scalar(tensor: torch.Tensor):
    """What ``.item()`` of a data-dependent fake tensor returns while planning: a harmless value."""
    if tensor.dtype == torch.bool:
        return bool(getattr(tensor, "_velora_truthy", False))
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return 1.0
    return 1


class StorageTracker(TorchDispatchMode):
    """Live bytes of every storage created while active (plus the ones handed to ``track``)."""

    def __init__(self, fake_scalars: bool = False) -> None:
        super().__init__()
        # storage address (StorageImpl*, unique while alive) -> (serial, bytes); serials are never reused
        self.live: dict[int, tuple[int, int]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_storages: list[tuple[int, int]] = []  # (serial, bytes) alive at the peak
        self.labels: dict[int, str] = {}  # serial -> category
        self.saved_live = 0  # bytes of live storages saved for backward (parameters excluded)
        self.saved_max = 0
        self._saved_serials: set[int] = set()
        self._serials = itertools.count()
        self._finalizers: list[weakref.finalize] = []
        self.fake_scalars = fake_scalars

    # ---- bookkeeping ---------------------------------------------------------------------------
    def track(self, storage: torch.UntypedStorage) -> int:
        """Serial of ``storage``, recording it as a new live allocation the first time it is seen."""
        key = storage._cdata
        entry = self.live.get(key)
        if entry is not None:
            serial, recorded = entry
            nbytes = storage.nbytes()
            if nbytes != recorded:  # resized in place (e.g. an out= op)
                self.live[key] = (serial, nbytes)
                self._add(nbytes - recorded)
            return serial
        serial = next(self._serials)
        nbytes = storage.nbytes()
        self.live[key] = (serial, nbytes)
        self._finalizers.append(weakref.finalize(storage, self._release, key, serial))
        self._add(nbytes)
        return serial

    def track_tensor(self, tensor: torch.Tensor) -> int:
        return self.track(tensor.untyped_storage())

    def label(self, tensor: torch.Tensor, category: str) -> None:
        serial = self.track_tensor(tensor)
        current = self.labels.get(serial)
        if current is None or _PRIORITY[category] < _PRIORITY[current]:
            self.labels[serial] = category

    def mark_saved(self, tensor: torch.Tensor) -> None:
        """Label a tensor autograd saved for backward and count it in the live saved bytes."""
        self.label(tensor, "activations")
        serial = self.track_tensor(tensor)
        if serial in self._saved_serials or self.labels.get(serial) == "parameters":
            return
        self._saved_serials.add(serial)
        self.saved_live += self.live[tensor.untyped_storage()._cdata][1]
        self.saved_max = max(self.saved_max, self.saved_live)

    def _add(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_storages = list(self.live.values())

    def _release(self, key: int, serial: int) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] == serial:
            del self.live[key]
            self.live_bytes -= entry[1]
            if serial in self._saved_serials:
                self._saved_serials.discard(serial)
                self.saved_live -= entry[1]

    def reset_peak(self) -> None:
        self.saved_max = self.saved_live
        self.peak_bytes = self.live_bytes
        self.peak_storages = list(self.live.values())

    def breakdown_at_peak(self) -> dict[str, int]:
        totals = dict.fromkeys(CATEGORIES, 0)
        for serial, nbytes in self.peak_storages:
            totals[self.labels.get(serial, "temporaries")] += nbytes
        return totals

    def close(self) -> None:
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()

    # ---- dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake_scalars and func is torch.ops.aten._local_scalar_dense.default:
            from torch._subclasses.fake_tensor import DataDependentOutputException

            try:  # fake tensors know the value of constants such as an optimizer's step counter
                return func(*args, **kwargs)
            except DataDependentOutputException:  # a value computed from data: nothing to plan with
                return _fake_scalar(args[0])
        out = func(*args, **kwargs)
        if self.fake_scalars and isinstance(out, torch.Tensor) and out.dtype == torch.bool \
                and func.__name__.split(".")[0] in _TRUTHY_OPS:
            out._velora_truthy = True
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.layout == torch.strided:
                self.track(item.untyped_storage())
        return out


def _state_tensors(optimizer: torch.optim.Optimizer | None) -> Iterable[torch.Tensor]:
    if optimizer is None:
        return
    for state in optimizer.state.values():
        values = state.values() if isinstance(state, dict) else [state]
        for value in values:
            for item in tree_flatten(value)[0]:
                if isinstance(item, torch.Tensor):
                    yield item


def _label_static(tracker: StorageTracker, model: nn.Module, optimizer) -> None:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        tracker.label(tensor, "parameters")
    for param in model.parameters():
        if param.grad is not None:
            tracker.label(param.grad, "gradients")
    for tensor in _state_tensors(optimizer):
        tracker.label(tensor, "optimizer_state")


def _on_cuda(model: nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters()) and torch.cuda.is_available()


def measure_step_peak(model: nn.Module, optimizer: torch.optim.Optimizer | None, step_fn: Callable[[], object], *,
                      steps: int = 2, fake_scalars: bool = False) -> PeakReport:
    """Run ``step_fn`` (one full training step: forward, backward, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)``) ``steps`` times and report the peak of the last one.

    The first step warms up (optimizer state appears in it); the peak is what
    ``torch.cuda.max_memory_allocated`` would report over the last step, split by category at the
    peak moment. Storages alive before the call are counted only if they belong to the model, its
    gradients or the optimizer state. ``fake_scalars=True`` lets ``.item()`` of fake tensors return 1
    (used by the planner; a real run never needs it).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1 (2 = warm-up step + measured step)")
    if not callable(step_fn):
        raise ValueError(f"step_fn={step_fn!r} is not callable; pass a function that runs one training step")
    tracker = StorageTracker(fake_scalars=fake_scalars)
    on_cuda = _on_cuda(model)
    hooks = []

    def label_grad(param: torch.Tensor) -> None:
        if param.grad is not None:
            tracker.label(param.grad, "gradients")

    def label_saved(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided:
            tracker.mark_saved(tensor)
        return tensor.detach()  # an alias without grad_fn: returning an output itself would leak its graph

    for param in model.parameters():
        if param.requires_grad:
            hooks.append(param.register_post_accumulate_grad_hook(label_grad))
    cuda_peak = None
    try:
        _label_static(tracker, model, optimizer)
        with tracker, torch.autograd.graph.saved_tensors_hooks(label_saved, lambda tensor: tensor):
            for step in range(steps):
                if step == steps - 1:
                    tracker.reset_peak()
                    if on_cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                step_fn()
                _label_static(tracker, model, optimizer)  # new buffers / optimizer state of this step
        if on_cuda:
            torch.cuda.synchronize()
            cuda_peak = int(torch.cuda.max_memory_allocated())
        return PeakReport(peak_bytes=int(tracker.peak_bytes), breakdown=tracker.breakdown_at_peak(),
                          cuda_max_memory_allocated=cuda_peak, steps=steps,
                          saved_activations_max=int(tracker.saved_max))
    finally:
        for hook in hooks:
            hook.remove()
        tracker.close()
