"""Training methods as data: one registry maps a method name to how it prepares a model and builds its
optimizer. The training loop, the planner, the HF trainer and the experiment harness all go through it; this
module is generic and names no method.

A method name is a base method optionally joined with modifiers by ``+``:
    base      full | lora | dora | qlora | galore | flora | gradnormlorp
    modifiers velora (compress saved activations), ckpt (gradient checkpointing)
e.g. ``velora`` (= full+velora), ``lora+velora``, ``galore+velora+ckpt``.

Adding a method: a folder ``methods/<name>/`` with ``config.py`` (its options, declared with ``common.option``,
and the ``section`` / ``prefix`` they live under) and ``method.py`` (prepare + optimizer, ending in
``register(BaseMethod(..., config=<its config class>))``), plus one import line in ``methods/__init__.py``;
its ``MethodOptions`` section, option keys and CLI flags follow from the registration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from velora.methods.common import OPTIMIZERS, projected_linear_weights, trainable_parameters
from velora.methods.options import MethodOptions, register_section

__all__ = ["BaseMethod", "Method", "MethodOptions", "register", "base_methods", "parse_method", "method_names",
           "check_optimizer", "prepare_model", "build_optimizer", "projected_linear_weights",
           "trainable_parameters"]


def keep_model(model: nn.Module, options: MethodOptions) -> nn.Module:
    """The ``prepare`` of a method that changes only the optimizer."""
    return model


def no_sized_options(rank: int, refresh_interval: int) -> dict[str, Any]:
    """``BaseMethod.sized`` of a method with neither a rank nor a refresh interval."""
    return {}


@dataclass(frozen=True)
class BaseMethod:
    """A base method: how it prepares a model and builds its optimizer from ``MethodOptions``.
    ``sized(rank, refresh_interval)``: the flat options that give the method rank r (adapter or projection)
    and refresh/resampling interval T — what an experiment varies across methods (``velora compare``)."""

    name: str
    description: str
    prepare: Callable[[nn.Module, MethodOptions], nn.Module]
    optimizer: Callable[[nn.Module, MethodOptions], torch.optim.Optimizer]
    optimizers: tuple[str, ...] = OPTIMIZERS  # optimizer choices that make sense with this method
    trainable: bool = True  # False: plannable only (a method whose kernels this machine lacks)
    sized: Callable[[int, int], dict[str, Any]] = no_sized_options
    config: type | None = None  # its options (a ConfigBase with a ``section``): MethodOptions.<section>


@dataclass(frozen=True)
class Method:
    """A parsed method name."""

    base: str
    velora: bool = False
    checkpointing: bool = False

    @property
    def name(self) -> str:
        parts = [self.base] if not (self.base == "full" and self.velora) else []
        if self.velora:
            parts.append("velora")
        if self.checkpointing:
            parts.append("ckpt")
        return "+".join(parts)


MODIFIERS = ("velora", "ckpt")
_BASES: dict[str, BaseMethod] = {}


def register(method: BaseMethod) -> BaseMethod:
    if method.name in _BASES or method.name in MODIFIERS or "+" in method.name:
        raise ValueError(f"method name {method.name!r} is taken or not a plain name; pick another")
    if method.config is not None:
        register_section(method.config)
    _BASES[method.name] = method
    return method


def base_methods() -> dict[str, BaseMethod]:
    return dict(_BASES)


def parse_method(name: str) -> Method:
    """``"lora+velora"`` -> Method(base="lora", velora=True). One-line error for unknown parts."""
    parts = [p.strip().lower() for p in name.split("+") if p.strip()]
    if not parts:
        raise ValueError(f"method {name!r} is empty; choose one of {sorted(_BASES)} (+velora, +ckpt)")
    bases = [p for p in parts if p in _BASES]
    unknown = [p for p in parts if p not in _BASES and p not in MODIFIERS]
    if unknown:
        raise ValueError(f"method {name!r}: unknown part(s) {unknown}; bases are {sorted(_BASES)}, "
                         f"modifiers are {list(MODIFIERS)}")
    if len(bases) > 1:
        raise ValueError(f"method {name!r} combines base methods {bases}; pick one base (+velora/+ckpt modifiers)")
    return Method(base=bases[0] if bases else "full", velora="velora" in parts, checkpointing="ckpt" in parts)


def method_names() -> list[str]:
    """Every canonical name the registry supports (bases, with and without modifiers)."""
    names = []
    for base in _BASES:
        for velora in (False, True):
            for ckpt in (False, True):
                names.append(Method(base, velora, ckpt).name)
    return names


def check_optimizer(method: Method, optimizer: str) -> None:
    allowed = _BASES[method.base].optimizers
    if optimizer not in allowed:
        raise ValueError(f"optimizer={optimizer!r} does not apply to method {method.name!r}; "
                         f"use one of {list(allowed)}")


def prepare_model(model: nn.Module, method: Method | str, options: MethodOptions | None = None) -> nn.Module:
    """Model surgery for a method (adapters, reparameterisation, VeLoRA, checkpointing). Returns the model
    to train (peft methods return the peft wrapper)."""
    method = parse_method(method) if isinstance(method, str) else method
    options = options or MethodOptions()
    base = _BASES[method.base]
    if not base.trainable:
        raise ValueError(f"method {method.name!r} cannot train on this machine ({base.description}); "
                         "use `velora plan` to estimate its memory")
    check_optimizer(method, options.optim.name)
    model = base.prepare(model, options)
    if method.velora:
        from velora.core.layers import apply_velora

        apply_velora(model, options.velora)
    if method.checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); "
                             "use a transformers model for +ckpt")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_optimizer(model: nn.Module, method: Method | str, options: MethodOptions | None = None):
    method = parse_method(method) if isinstance(method, str) else method
    options = options or MethodOptions()
    check_optimizer(method, options.optim.name)
    return _BASES[method.base].optimizer(model, options)


