"""velora-torch: train transformers in less memory.

Core (this package): VeLoRA rank-1 sub-token compression of the activations saved for backward.
Sub-packages: ``velora.memory`` (meter, peak tracker, planner), ``velora.optim`` (FLoRA, GaLore,
GradNormLoRP optimizers). Names of optional parts are resolved lazily so ``import velora`` stays light.
"""

from __future__ import annotations

import importlib

from velora.config import VeLoRAConfig
from velora.functional import velora_linear
from velora.layers import apply_velora, is_velora_module, load_peft_velora_state, remove_velora, velora_modules

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use)
_LAZY = {
    "apply_gradnorm_lorp": "velora.gradnorm_lorp",
    "GradNormLoRPConfig": "velora.gradnorm_lorp",
    "merge_gradnorm_lorp": "velora.gradnorm_lorp",
    "load_velora_state": "velora.persistence",
    "require_velora_state": "velora.persistence",
    # the module is velora.fidelity: a submodule named velora.diagnose would shadow this function once imported
    "diagnose": "velora.fidelity",
    "FidelityReport": "velora.fidelity",
}

# sub-packages reachable as attributes (``velora.hf.trainer_optimizer``) and imported on first use, so that
# ``import velora`` does not import transformers
_SUBMODULES = ("hf", "memory", "optim", "distributed", "registry", "train", "models", "data")

__all__ = [
    "VeLoRAConfig",
    "apply_velora",
    "remove_velora",
    "velora_linear",
    "velora_modules",
    "is_velora_module",
    "load_peft_velora_state",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"velora.{name}")
    raise AttributeError(f"module 'velora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
