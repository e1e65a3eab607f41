"""`SavedActivationMeter`: the bytes a forward pass really keeps for backward, per module.

Every tensor autograd saves goes through ``saved_tensors_hooks``; we key it by its untyped storage, so
views and a tensor saved by several ops (one input feeding q, k and v) count once. Parameters and
buffers are excluded by storage, because a Linear's weight arrives as a plain ``.t()`` view, not as a
Parameter. A storage is charged to the module whose forward was running when it was first saved
(forward pre/post hooks keep a module stack), and it counts only if it is still alive when the
``with`` block ends: storage addresses are only meaningful while the storage lives, and a saved
tensor that died before backward was never kept. A checkpointed region saves its inputs through our
hook and hides its inner saves behind its own, so it is counted as what it really keeps.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from velora.core.observer import mark_observer

OUTSIDE = "(outside modules)"
ROOT = "(model)"


class SavedActivationMeter:
    """``with SavedActivationMeter(model) as meter: loss = model(**batch).loss`` then
    ``meter.total_bytes``, ``meter.by_module()``, ``meter.report()``.

    Without a model every module's forward is tracked (by class name) and nothing is excluded but
    parameters and buffers of modules that ran.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self.model = model
        # storage address -> [bytes, module name, finalizer]; only live, non-parameter storages
        self._saved: dict[int, list] = {}
        self._stack: list[str] = []
        self._handles: list = []
        self._seen_modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._hooks_ctx = None
        self._result: dict[str, int] | None = None
        self._active = False

    # ---- context ---------------------------------------------------------------------------------
    def __enter__(self) -> SavedActivationMeter:
        if self._active:
            raise ValueError("this SavedActivationMeter is already active; create a new one per forward pass")
        self._saved.clear()
        self._result = None
        self._install_module_hooks()
        self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks_ctx.__enter__()
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._hooks_ctx.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False
        excluded = self._parameter_storages()
        totals: dict[str, int] = {}
        for key, (nbytes, owner, finalizer) in self._saved.items():
            finalizer.detach()
            if key in excluded:  # e.g. a VeLoRA direction buffer set during this forward
                continue
            totals[owner] = totals.get(owner, 0) + nbytes
        self._saved.clear()
        self._stack.clear()
        self._result = totals

    # ---- results -------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(self._results().values())

    def by_module(self) -> dict[str, int]:
        """Qualified module name -> bytes first saved while that module's forward ran, largest first."""
        return dict(sorted(self._results().items(), key=lambda item: (-item[1], item[0])))

    def report(self, top: int | None = None) -> str:
        rows = list(self.by_module().items())
        if top is not None:
            rows = rows[:top]
        total = self.total_bytes
        width = max([len("module")] + [len(name) for name, _ in rows])
        lines = [f"{'module':<{width}}  {'MiB':>10}  {'share':>6}"]
        for name, nbytes in rows:
            share = nbytes / total if total else 0.0
            lines.append(f"{name:<{width}}  {nbytes / 2**20:10.3f}  {share:6.1%}")
        lines.append(f"{'total (unique storages)':<{width}}  {total / 2**20:10.3f}")
        return "\n".join(lines)

    def _results(self) -> dict[str, int]:
        if self._result is None:
            raise ValueError("the meter has no result yet; read it after the `with SavedActivationMeter(...)` block")
        return self._result

    # ---- hooks ---------------------------------------------------------------------------------
    def _install_module_hooks(self) -> None:
        if self.model is not None:
            for name, module in self.model.named_modules():
                label = name or ROOT
                self._handles.append(module.register_forward_pre_hook(self._enter_module(label)))
                self._handles.append(module.register_forward_hook(self._exit_module, always_call=True))
        else:
            register_pre = nn.modules.module.register_module_forward_pre_hook
            register_post = nn.modules.module.register_module_forward_hook

            @mark_observer
            def pre(module, args):
                self._seen_modules.add(module)
                self._stack.append(type(module).__name__)

            self._handles.append(register_pre(pre))
            self._handles.append(register_post(self._exit_module, always_call=True))

    def _enter_module(self, label: str):
        @mark_observer
        def pre(module, args):
            self._stack.append(label)

        return pre

    @mark_observer
    def _exit_module(self, module, args, output) -> None:
        if self._stack:
            self._stack.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # hand autograd a detached alias: an op's output returned as is would hold its own grad_fn and
        # make a reference cycle that keeps the whole graph (and every saved tensor) alive
        if tensor.layout != torch.strided:
            return tensor.detach()
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._saved:
            owner = self._stack[-1] if self._stack else OUTSIDE
            # forget the entry when the storage dies: its address may then be reused by another one
            finalizer = weakref.finalize(storage, self._saved.pop, key, None)
            self._saved[key] = [storage.nbytes(), owner, finalizer]
        return tensor.detach()

    def _parameter_storages(self) -> set[int]:
        modules = [self.model] if self.model is not None else list(self._seen_modules)
        keys = set()
        for module in modules:
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                keys.add(tensor.untyped_storage()._cdata)
        return keys


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
