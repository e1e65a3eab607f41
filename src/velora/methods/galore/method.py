"""``galore``: GaLore-projected AdamW (velora.optim.GaLoreAdamW) on the attention/MLP weights, full AdamW
state for the rest; a VeLoRA-wrapped weight is projected on its gradient's own subspace."""

from __future__ import annotations

from torch import nn

from velora.methods.common import projected_linear_weights
from velora.methods.galore.config import GaLoreConfig
from velora.methods.options import MethodOptions
from velora.methods.registry import BaseMethod, keep_model, register


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


def projected_groups(projected: list[nn.Parameter], config: GaLoreConfig, velora_subspaces: dict) -> list[dict]:
    """One GaLore param group per (rank, side): rank = the config's (default a quarter of the smaller side),
    capped by a VeLoRA weight's gradient subspace, whose side it takes."""
    by_rank: dict[tuple[int, str], list[nn.Parameter]] = {}
    for p in projected:
        rank, side = config.rank or max(1, min(p.shape) // 4), "std"
        if id(p) in velora_subspaces:  # a VeLoRA weight: its gradient's own subspace, never noise
            possible, side = velora_subspaces[id(p)]
            rank = min(rank, possible)
        by_rank.setdefault((rank, side), []).append(p)
    return [{"params": params, "rank": rank, "update_proj_gap": config.update_proj_gap, "scale": config.scale,
             "proj_type": side} for (rank, side), params in by_rank.items()]


def galore_optimizer(model: nn.Module, options: MethodOptions):
    from velora.optim import GaLoreAdamW

    projected, rest = projected_linear_weights(model)
    groups = [{"params": rest}] if rest else []
    if projected:
        groups += projected_groups(projected, options.galore, velora_gradient_subspaces(model))
    return GaLoreAdamW(groups, **options.optim.adam_kwargs(), eight_bit=options.optim.name == "adamw8bit")


def sized_galore(rank: int, refresh_interval: int) -> dict:
    return {"galore_rank": rank, "update_proj_gap": refresh_interval, "galore_scale": 0.25}


register(BaseMethod("galore", "GaLore-projected AdamW on attention/MLP weights", keep_model, galore_optimizer,
                    optimizers=("adamw", "adamw8bit"), sized=sized_galore, config=GaLoreConfig))
