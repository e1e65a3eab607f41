"""The marker of a forward hook that only watches, owned by the memory meter that installs such hooks.

A kernel that skips module calls (the fused LoRA path runs a peft layer's children inline) must still run every
hook that can change a result; it may skip only hooks marked here. Torch-free and import-light, so ``velora.core``
can ask without importing the meter.
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
