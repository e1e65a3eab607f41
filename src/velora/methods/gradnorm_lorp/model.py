"""GradNormLoRP reparameterisation (Huang et al., eq. 8-9) and its merge back to ``nn.Linear``.

A targeted ``nn.Linear`` with frozen weight W0 (out, in) becomes

    V = W0 + s * I @ J                      # (out, in); I (out, r) zeros, J (r, in) Kaiming; s = alpha / r
    W = m * V / ||V||_c                      # m (out,) trainable, ||V||_c: L2 norm of each output row

with the magnitude m initialised to ||W0||_c, so W == W0 bitwise at init (the per-row factor m/||V||
is exactly 1.0). "Column" in the paper's W in R^{k x m}, M in R^{1 x m} is one output neuron's weight
vector, i.e. one row of torch's (out, in) weight: that is what we normalise. ``merge_gradnorm_lorp``
folds W back into a plain ``nn.Linear`` (no inference overhead). The factor gradients are projected
GaLore-style by ``velora.optim.gradnorm_lorp_optimizer``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from velora.core.layers import register_layer_type

__all__ = [
    "GradNormLoRPConfig",
    "GradNormLoRPLinear",
    "apply_gradnorm_lorp",
    "merge_gradnorm_lorp",
    "gradnorm_lorp_modules",
]

_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class GradNormLoRPConfig:
    """What to reparameterise and how.

    rank: LoRA rank r of I (out, r) and J (r, in).
    alpha: LoRA scaling numerator; the factor product is scaled by s = alpha / rank.
    target_modules: names of ``nn.Linear`` modules: a sequence of last-name components
        (e.g. ("q_proj", "v_proj")) or one regular expression matched against the full qualified name.
    freeze_non_targeted: True freezes every parameter outside the targeted modules (fine-tuning);
        False (default) leaves them as they are (pre-training: embeddings/norms/head keep training).
    version: config schema version (serialised with the config).
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | str = _DEFAULT_TARGETS
    freeze_non_targeted: bool = False
    version: int = 1

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"GradNormLoRPConfig: rank={self.rank!r} must be a positive integer")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"GradNormLoRPConfig: alpha={self.alpha!r} must be a positive number")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"GradNormLoRPConfig: target_modules={self.target_modules!r} is not a valid "
                                 f"regular expression ({err})") from None
        else:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("GradNormLoRPConfig: target_modules is empty; name at least one linear layer")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        if isinstance(data["target_modules"], tuple):
            data["target_modules"] = list(data["target_modules"])
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> GradNormLoRPConfig:
        data = json.loads(text)
        if data.get("version", 1) != 1:
            raise ValueError(f"GradNormLoRPConfig version {data['version']} is newer than this library (1)")
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)

    def matches(self, qualified_name: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, qualified_name) is not None
        return qualified_name.rsplit(".", 1)[-1] in self.target_modules or qualified_name in self.target_modules


class GradNormLoRPLinear(nn.Module):
    """y = x @ (m * V / ||V||_c).T + b with V = W0 + s * I @ J; W0 and b frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling = rank, alpha / rank
        weight = base.weight.detach()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)  # W0 (out, in), frozen
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_I = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        self.lora_J = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_J, a=math.sqrt(5))  # LoRA's init of its A factor
        # same expression as in forward, so m / ||V||_c is exactly 1.0 at init
        self.magnitude = nn.Parameter(self._row_norm(self.weight.detach()))  # (out,)

    @staticmethod
    def _row_norm(direction: torch.Tensor) -> torch.Tensor:
        return direction.norm(p=2, dim=1).clamp_min(1e-12)  # (out,)

    def merged_weight(self) -> torch.Tensor:
        direction = self.weight + self.scaling * (self.lora_I @ self.lora_J)  # (out, in)
        factor = self.magnitude / self._row_norm(direction)  # (out,)
        return direction * factor[:, None]  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class _VeLoRALayout:
    """What VeLoRA needs to wrap a GradNormLoRP layer (velora.core.layers.register_layer_type): its weight
    W = m ⊙ (W0 + s·IJ)/‖W0 + s·IJ‖_c is built every forward; W0 is frozen, so VeLoRA is active when m, I or J
    train, and grad_W flows on to them through autograd."""

    def _velora_weight(self) -> torch.Tensor:
        return self.merged_weight()  # (O, D)

    def _velora_in_features(self) -> int:
        return self.in_features

    def _velora_active(self, x: torch.Tensor) -> bool:
        trains = self.magnitude.requires_grad or self.lora_I.requires_grad or self.lora_J.requires_grad
        return self.training and torch.is_grad_enabled() and trains


# apply_velora wraps GradNormLoRP layers through this (bound here under its own name, so pickle finds it)
VeLoRAGradNormLoRPLinear = register_layer_type(GradNormLoRPLinear, _VeLoRALayout, "VeLoRAGradNormLoRPLinear")


def gradnorm_lorp_modules(model: nn.Module) -> dict[str, GradNormLoRPLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, GradNormLoRPLinear)}


def _set_submodule(model: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent_name, _, child_name = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def apply_gradnorm_lorp(
    model: nn.Module,
    config: GradNormLoRPConfig,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` modules of ``model`` in place; returns ``model``.

    ``filter_fn(name, module)`` can further restrict the targets. Raises ValueError when nothing matches.
    """
    if not isinstance(config, GradNormLoRPConfig):
        raise ValueError(f"apply_gradnorm_lorp needs a GradNormLoRPConfig, got {type(config).__name__}")
    targets = [
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and config.matches(name) and (filter_fn is None or filter_fn(name, module))
    ]
    if not targets:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules={config.target_modules!r} matched no nn.Linear; the model's linear "
                         f"layers are named {linears}")
    if config.freeze_non_targeted:
        for param in model.parameters():
            param.requires_grad_(False)
    for name in targets:
        _set_submodule(model, name, GradNormLoRPLinear(model.get_submodule(name), config.rank, config.alpha))
    return model


@torch.no_grad()
def merge_gradnorm_lorp(model: nn.Module) -> nn.Module:
    """Fold every GradNormLoRP layer into a plain ``nn.Linear`` holding m * V / ||V||_c (in place)."""
    modules = gradnorm_lorp_modules(model)
    if not modules:
        raise ValueError("merge_gradnorm_lorp: the model has no GradNormLoRP layers; call apply_gradnorm_lorp first")
    for name, module in modules.items():
        weight = module.merged_weight()  # (out, in)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        _set_submodule(model, name, linear)
    return model
