"""The marker of a forward hook that only watches, shared by the memory meter (which marks its hooks) and the fused
LoRA kernel (which may skip marked hooks on the children it runs inline, and must run every other hook).

Torch-free, so the kernel asks without importing the meter and ``import velora`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["mark_observer", "is_observer"]

_FLAG = "_velora_observer"


def mark_observer(hook: Callable) -> Callable:
    """Mark a forward (pre-)hook that only watches: the fused path may skip it on the children it does not call.
    Returns the hook, so it works as a decorator."""
    setattr(hook, _FLAG, True)
    return hook


def is_observer(hook: Callable) -> bool:
    """True for a hook marked by ``mark_observer`` (a bound method is checked through its function)."""
    return getattr(getattr(hook, "__func__", hook), _FLAG, False)
