"""velora-torch: train transformers in less memory.

The public API is re-exported here: ``apply_velora`` / ``remove_velora`` (the VeLoRA op, ``velora.core``),
``velora.optim`` (FLoRA, GaLore, GradNormLoRP optimizers), ``velora.memory`` (meter, peak tracker, planner).
ARCHITECTURE.md maps the other sub-packages. Optional parts resolve lazily so ``import velora`` stays light.
"""

from __future__ import annotations

import importlib

from velora.core.config import VeLoRAConfig
from velora.core.functional import velora_linear
from velora.core.layers import apply_velora, is_velora_module, load_peft_velora_state, remove_velora, velora_modules

__version__ = "0.2.0"

# public name -> module that defines it (imported on first use)
_LAZY = {
    "apply_gradnorm_lorp": "velora.methods.gradnorm_lorp.model",
    "GradNormLoRPConfig": "velora.methods.gradnorm_lorp.model",
    "merge_gradnorm_lorp": "velora.methods.gradnorm_lorp.model",
    "load_velora_state": "velora.core.persistence",
    "require_velora_state": "velora.core.persistence",
    # the module is velora.core.fidelity: a submodule named velora.diagnose would shadow this function once imported
    "diagnose": "velora.core.fidelity",
    "FidelityReport": "velora.core.fidelity",
}

# sub-packages reachable as attributes (``velora.integrations.hf.trainer_optimizer``) and imported on first use, so that
# ``import velora`` does not import transformers
_SUBMODULES = ("core", "methods", "training", "integrations", "memory", "optim", "experiments", "cli")

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
