"""Training methods as data: one registry maps a method name to how it prepares a model and builds its
optimizer. The training loop, the planner and the experiment harness all go through it.

A method name is a base method optionally joined with modifiers by ``+``:
    base      full | lora | dora | qlora | galore | flora | gradnormlorp
    modifiers velora (compress saved activations), ckpt (gradient checkpointing)
e.g. ``velora`` (= full+velora), ``lora+velora``, ``galore+velora+ckpt``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from velora.core.config import VeLoRAConfig

OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")


@dataclass
class MethodOptions:
    """Hyper-parameters of every method; each method reads the fields it needs."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"
    # LoRA / DoRA (peft)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Any = "all-linear"
    # names (substrings) of non-adapter parameters that stay trainable, e.g. ("embed_tokens", "norm",
    # "lm_head") when pre-training from scratch with LoRA
    lora_unfreeze: tuple[str, ...] = ()
    # QLoRA (bitsandbytes NF4 base): auto = the model's weight dtype (float32 | bfloat16 | float16)
    qlora_compute_dtype: str = "auto"
    # VeLoRA
    velora: VeLoRAConfig = field(default_factory=lambda: VeLoRAConfig(sub_token_size=32, target_modules="paper"))
    # GaLore (rank None -> a quarter of the smaller side of each projected weight)
    galore_rank: int | None = None
    update_proj_gap: int = 200
    galore_scale: float = 0.25
    # FLoRA
    flora_rank: int | None = None
    flora_kappa: int = 1000
    flora_accumulation: bool = False
    # compressed accumulation: orthonormal projection rows (default, less noise) or the paper's Gaussian (False)
    flora_orthogonal: bool = True
    # side of each matrix FLoRA projects (momentum and accumulation): "smaller" (FLoRA code, less noise) or "larger"
    flora_project: str = "smaller"
    # FLoRA momentum options (velora.optim.Flora; defaults = the paper's Alg. 2): what the momentum averages
    # ("gradient" | "update"), the current step kept exact, orthonormal momentum rows (flora_orthogonal is the
    # accumulator's)
    flora_momentum: str = "gradient"
    flora_exact_current: bool = False
    flora_momentum_orthogonal: bool = False
    accumulation_steps: int = 1
    # GradNormLoRP
    gradnorm_rank: int = 8
    gradnorm_alpha: float = 16.0
    gradnorm_proj_rank: int = 4
    gradnorm_update_proj_gap: int = 250
    gradnorm_scale: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is unknown; choose one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={self.accumulation_steps} must be >= 1")
        from velora.optim.projections import check_project_side

        check_project_side(self.flora_project)
        if self.flora_momentum not in ("gradient", "update"):
            raise ValueError(f"flora_momentum={self.flora_momentum!r} is not 'gradient' (Alg. 2) or 'update' "
                             "(the FLoRA authors' package)")
        from velora.methods.lora.qlora import COMPUTE_DTYPES

        if self.qlora_compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"qlora_compute_dtype={self.qlora_compute_dtype!r} is unknown; choose one of "
                             f"{list(COMPUTE_DTYPES)}")


@dataclass(frozen=True)
class BaseMethod:
    name: str
    description: str
    prepare: Callable[[nn.Module, MethodOptions], nn.Module]
    optimizer: Callable[[nn.Module, MethodOptions], torch.optim.Optimizer]
    optimizers: tuple[str, ...] = OPTIMIZERS  # optimizer choices that make sense with this method
    trainable: bool = True  # False: plannable only (a method whose kernels this machine lacks)


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
    check_optimizer(method, options.optimizer)
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
    check_optimizer(method, options.optimizer)
    return _BASES[method.base].optimizer(model, options)


# ---- base methods ----------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _standard_optimizer(params, options: MethodOptions) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("the model has no trainable parameters; check the method's target modules")
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.lr, betas=options.betas, weight_decay=options.weight_decay)
    if options.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=options.lr, weight_decay=options.weight_decay)
    from velora.optim import GaLoreAdamW  # adamw8bit: GaLoreAdamW without projected groups, 8-bit moments

    return GaLoreAdamW([{"params": params}], lr=options.lr, betas=options.betas,
                       weight_decay=options.weight_decay, eight_bit=True)


def _identity(model: nn.Module, options: MethodOptions) -> nn.Module:
    return model


def _all_params_optimizer(model: nn.Module, options: MethodOptions):
    return _standard_optimizer(trainable_parameters(model), options)


def _peft_lora(use_dora: bool):
    def prepare(model: nn.Module, options: MethodOptions) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                            target_modules=options.lora_targets, use_dora=use_dora, bias="none")
        model = get_peft_model(model, config)
        for name, param in model.named_parameters():
            if any(key in name for key in options.lora_unfreeze):
                param.requires_grad_(True)
        return model

    return prepare


def projected_linear_weights(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(matrices to project, everything else trainable) — the GaLore/FLoRA split: trainable weights of
    nn.Linear and GPT-2 Conv1D layers; embeddings and the LM head keep full optimizer state, as in the
    GaLore and FLoRA papers (velora.optim.projections.projectable_parameters)."""
    from velora.optim.projections import projectable_split

    return projectable_split(model)


def velora_gradient_subspaces(model: nn.Module) -> dict[int, tuple[int, str]]:
    """id(weight) -> (the most its gradient's rank can be, the GaLore side holding the VeLoRA structure) for each
    VeLoRA-wrapped weight. Its gradient is (Gᵀz) ⊗ v per M-chunk: rows (nn.Linear (O, D)) or columns (Conv1D
    (D, O)) lie in span(v) per chunk, a space of dimension ceil(D/M)·r. Projecting that side ("right" for Linear,
    "left" for Conv1D) on at most that many singular vectors keeps every update in it; more vectors add
    zero-singular-value directions whose rounding noise Adam normalises into full-size steps."""
    from velora.core.layers import velora_modules

    subspaces = {}
    for layer in velora_modules(model).values():
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        in_features, size = layer._velora_in_features(), layer.velora_sub_token_size
        possible = -(-in_features // size) * layer.velora_config.rank  # ceil(D / M) * r
        linear = isinstance(layer, nn.Linear)
        out_features = weight.shape[0] if linear else weight.shape[1]
        subspaces[id(weight)] = (max(1, min(possible, out_features)), "right" if linear else "left")
    return subspaces


def _galore_optimizer(model: nn.Module, options: MethodOptions):
    from velora.optim import GaLoreAdamW

    projected, rest = projected_linear_weights(model)
    velora_subspaces = velora_gradient_subspaces(model)
    groups = []
    if rest:
        groups.append({"params": rest})
    if projected:
        by_rank: dict[tuple[int, str], list[nn.Parameter]] = {}
        for p in projected:
            rank, side = options.galore_rank or max(1, min(p.shape) // 4), "std"
            if id(p) in velora_subspaces:  # a VeLoRA weight: its gradient's own subspace, never noise
                possible, side = velora_subspaces[id(p)]
                rank = min(rank, possible)
            by_rank.setdefault((rank, side), []).append(p)
        for (rank, side), params in by_rank.items():
            groups.append({"params": params, "rank": rank, "update_proj_gap": options.update_proj_gap,
                           "scale": options.galore_scale, "proj_type": side})
    return GaLoreAdamW(groups, lr=options.lr, betas=options.betas, weight_decay=options.weight_decay,
                       eight_bit=options.optimizer == "adamw8bit")


def flora_rank(options: MethodOptions, params) -> int:
    """FLoRA's rank: ``options.flora_rank``, or a quarter of the smallest side among the 2-D ``params``."""
    return options.flora_rank or max(1, min(min(p.shape) for p in params if p.dim() == 2) // 4)


def _flora_optimizer(model: nn.Module, options: MethodOptions):
    from velora.optim import Flora

    rank = flora_rank(options, trainable_parameters(model))
    base = "adamw" if options.optimizer in ("adamw", "adamw8bit") else "adafactor"
    # pass the model, not a parameter list: Flora then compresses only attention/MLP matrices and keeps
    # embeddings and the head uncompressed (a vocabulary-wide random projection stalls training)
    return Flora(model, lr=options.lr, rank=rank, kappa=options.flora_kappa, base=base, seed=options.seed,
                 project=options.flora_project, momentum=options.flora_momentum,
                 exact_current=options.flora_exact_current, orthogonal=options.flora_momentum_orthogonal)


def _gradnorm_prepare(model: nn.Module, options: MethodOptions) -> nn.Module:
    from velora.methods.gradnorm_lorp.model import GradNormLoRPConfig, apply_gradnorm_lorp

    return apply_gradnorm_lorp(model, GradNormLoRPConfig(rank=options.gradnorm_rank, alpha=options.gradnorm_alpha))


def _gradnorm_optimizer(model: nn.Module, options: MethodOptions):
    from velora.optim import gradnorm_lorp_optimizer

    return gradnorm_lorp_optimizer(model, lr=options.lr, proj_rank=options.gradnorm_proj_rank,
                                   update_proj_gap=options.gradnorm_update_proj_gap, scale=options.gradnorm_scale,
                                   eight_bit=options.optimizer == "adamw8bit")


def _qlora_prepare(model: nn.Module, options: MethodOptions) -> nn.Module:
    from velora.methods.lora.qlora import quantize_base_linears

    quantize_base_linears(model, options.qlora_compute_dtype)  # frozen base -> bitsandbytes NF4 Linear4bit
    return _peft_lora(False)(model, options)  # peft wraps each Linear4bit with its bnb LoRA layer


register(BaseMethod("full", "all parameters train", _identity, _all_params_optimizer))
register(BaseMethod("lora", "peft LoRA adapters on all linear layers", _peft_lora(False), _all_params_optimizer))
register(BaseMethod("dora", "peft DoRA adapters on all linear layers", _peft_lora(True), _all_params_optimizer))
register(BaseMethod("qlora", "bitsandbytes NF4 frozen base (double quantisation) + peft LoRA", _qlora_prepare,
                    _all_params_optimizer))
register(BaseMethod("galore", "GaLore-projected AdamW on attention/MLP weights", _identity, _galore_optimizer,
                    optimizers=("adamw", "adamw8bit")))
register(BaseMethod("flora", "FLoRA compressed momentum (Adafactor or AdamW base)", _identity, _flora_optimizer,
                    optimizers=("adafactor", "adamw")))
register(BaseMethod("gradnormlorp", "weight-normalised LoRA with projected factor gradients", _gradnorm_prepare,
                    _gradnorm_optimizer, optimizers=("adamw", "adamw8bit")))


def with_options(options: MethodOptions, **changes: Any) -> MethodOptions:
    return replace(options, **changes)
