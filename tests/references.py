"""Small independent references for the op tests: a saved-for-backward byte counter (the library's meter is
tested against analytic counts in test_memory_meter.py, so the op tests do not depend on it) and a hook that
captures each module's input and output gradient."""

from __future__ import annotations

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, run) -> int:
    """Unique bytes autograd keeps for backward while ``run()`` builds the graph, then runs backward.

    Deduplicated by untyped-storage pointer (several views of one tensor count once); parameters and buffers
    excluded by storage pointer (a Linear's weight reaches the hook as a plain ``.t()`` view), looked up after
    the forward because VeLoRA creates its v buffers during the first one. The saved tensors are kept alive
    until counting ends, so no pointer is reused by a later allocation.
    """
    storages: dict[int, int] = {}
    keep_alive: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        keep_alive.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = run()
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    total = sum(nbytes for pointer, nbytes in storages.items() if pointer not in excluded)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def capture_io(modules: dict[str, nn.Module]):
    """Forward hooks recording each module's input and the gradient of its output.
    Returns (inputs, grads, handles); remove the handles when done."""
    inputs, grads = {}, {}

    def hook_for(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            output.register_hook(lambda grad: grads.__setitem__(name, grad.detach()))
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    return inputs, grads, handles
