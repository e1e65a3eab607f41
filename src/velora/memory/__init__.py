"""Memory you can trust: what a forward pass keeps for backward, the peak of a whole training step by
category (real tensors or ``FakeTensorMode``), and a planner that predicts it for 7B-scale models.

Names resolve on first use, so ``velora.core`` can import the light ``velora.memory.observer`` without loading the
planner."""

from __future__ import annotations

import importlib

# public name -> module that defines it
_LAZY = {
    "CATEGORIES": "velora.memory.peak",
    "NF4Linear": "velora.memory.nf4",
    "PeakReport": "velora.memory.peak",
    "SavedActivationMeter": "velora.memory.meter",
    "StorageTracker": "velora.memory.peak",
    "measure_step_peak": "velora.memory.peak",
    "plan": "velora.memory.planner",
    "training_setup": "velora.memory.planner",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'velora.memory' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
