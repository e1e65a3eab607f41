"""An independent reference counter of saved-for-backward bytes (the library's meter is tested against
analytic counts in test_memory_meter.py; the op tests use this small counter so they do not depend on it)."""

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
