"""Integrations with the wider stack: ``hf`` (transformers Trainer, peft) and ``distributed`` (DDP, FSDP2, process
groups; it re-exports ``comm_hook``, the FLoRA-compressed all-reduce, and ``launch``, the local multi-process
launcher). Each resolves on first use so ``import velora.integrations`` stays light."""

from __future__ import annotations

import importlib

_SUBMODULES = ("hf", "distributed", "comm_hook", "launch")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"velora.integrations.{name}")
    raise AttributeError(f"module 'velora.integrations' has no attribute {name!r}")
