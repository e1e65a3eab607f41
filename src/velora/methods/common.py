"""What every method shares: the declared-option helpers behind each method's config, the one
``OptimizerSettings`` every optimizer receives, the trainable / projectable parameter split and the
standard (AdamW / Adafactor) optimizer.

A method's config is a dataclass whose fields are declared with ``option(...)``: the field's default, its
help text and, where a legacy spelling exists, its flat key (``update_proj_gap``) and CLI flag. The CLI
flags, ``TrainConfig.options`` keys, planner ``**options`` and HF ``method_options`` are all generated from
these declarations (``velora.methods.options``), so an option is declared in one place.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")
DEFAULT_BETAS = (0.9, 0.999)


def option(default: Any = MISSING, help: str = "", *, key: str | None = None, flag: str | None = None,
           choices: dict[str, Any] | None = None, kind: type | None = None, factory: Any = MISSING) -> Any:
    """A config field with what the translations need: ``help`` (CLI), ``key`` (flat option name, default
    ``<prefix>_<field>``), ``flag`` (CLI flag, default ``--<key with dashes>``; "" for no flag), ``choices``
    (CLI word -> value, for a field whose CLI spelling is a word) and ``kind`` (the CLI type when the default
    is None)."""
    metadata = {"help": help, "key": key, "flag": flag, "choices": choices, "kind": kind}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class ConfigBase:
    """JSON round trip shared by the method configs: ``to_dict`` gives plain JSON values, ``from_dict``
    rejects unknown keys in one line."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def check_int(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        suffix = " (or None for the default)" if optional else ""
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{suffix}")


def check_number(name: str, value: Any, *, positive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name}={value!r} must be a finite number {'> 0' if positive else '>= 0'}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


@dataclass
class OptimizerSettings(ConfigBase):
    """The settings every optimizer receives, in one place.

    name: the base optimizer (adamw | adafactor | adamw8bit; each method says which apply).
    lr, weight_decay: peak learning rate and decoupled weight decay (AdamW's, lr-scaled).
    betas: (beta1, beta2). Adafactor has no betas: the plain Adafactor rejects non-default ones, and FLoRA's
        Adafactor base uses beta1 for its compressed momentum and rejects a non-default beta2.
    eps: Adam's eps; None keeps each optimizer's own default (1e-8). Adafactor (plain or FLoRA's base) rejects
        one, since it does not use it.
    """

    section = "optim"  # options.optim
    prefix = ""
    name: str = option("adamw", "base optimizer: adamw | adafactor | adamw8bit (default adamw)", key="optimizer")
    lr: float = option(1e-3, "", key="lr", flag="")
    weight_decay: float = option(0.0, "", key="weight_decay", flag="")
    betas: tuple[float, float] = option(DEFAULT_BETAS, "Adam betas: BETA1 BETA2 (default 0.9 0.999)", key="betas")
    eps: float | None = option(None, "Adam eps (default: the optimizer's own, 1e-8)", key="eps", kind=float)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.name!r} is unknown; choose one of {OPTIMIZERS}")
        check_number("lr", self.lr)
        check_number("weight_decay", self.weight_decay, positive=False)
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas={self.betas!r} must be two numbers in [0, 1), e.g. (0.9, 0.999)")
        self.betas = (float(betas[0]), float(betas[1]))
        if self.eps is not None:
            check_number("eps", self.eps)

    def adam_kwargs(self) -> dict[str, Any]:
        """lr, betas, weight_decay (and eps when set) as Adam-style optimizers take them."""
        kwargs = {"lr": self.lr, "betas": self.betas, "weight_decay": self.weight_decay}
        if self.eps is not None:
            kwargs["eps"] = self.eps
        return kwargs


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def projected_linear_weights(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(matrices to project, everything else trainable) — the GaLore/FLoRA split: trainable weights of
    nn.Linear and GPT-2 Conv1D layers; embeddings and the LM head keep full optimizer state, as in the
    GaLore and FLoRA papers (velora.optim.projections.projectable_parameters)."""
    from velora.optim.projections import projectable_split

    return projectable_split(model)


def standard_optimizer(params, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """AdamW, Adafactor or 8-bit AdamW over ``params`` with ``settings``."""
    params = list(params)
    if not params:
        raise ValueError("the model has no trainable parameters; check the method's target modules")
    if settings.name == "adamw":
        return torch.optim.AdamW(params, **settings.adam_kwargs())
    if settings.name == "adafactor":
        if settings.betas != DEFAULT_BETAS or settings.eps is not None:
            raise ValueError(f"betas={settings.betas} / eps={settings.eps} do not apply to optimizer='adafactor' (it "
                             "keeps no Adam moments); drop them or use optimizer='adamw'")
        return torch.optim.Adafactor(params, lr=settings.lr, weight_decay=settings.weight_decay)
    from velora.optim import GaLoreAdamW  # adamw8bit: GaLoreAdamW without projected groups, 8-bit moments

    return GaLoreAdamW([{"params": params}], **settings.adam_kwargs(), eight_bit=True)
