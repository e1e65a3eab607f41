"""The GradNormLoRP optimizer: GaLore-projected Adam on the LoRA factors I and J (paper eq. 10-12).

I (out, r) and J (r, in) are low-rank already; their gradients are projected once more on the top
``proj_rank`` singular vectors (proj_rank < r), so Adam keeps (out, proj_rank) + (proj_rank, in)
moments instead of (out, r) + (r, in). "std" projection picks the factor's short side (r): the
right side for I, the left side for J. Magnitudes and every other trainable parameter use plain AdamW.
Under FSDP2 (``fully_shard``) it runs as GaLoreAdamW does (``optim.sharded_svd``): J's rows are sharded, so its
"left" projection all-reduces a (proj_rank, in) sum per step.
"""

from __future__ import annotations

from torch import nn

from velora.methods.gradnorm_lorp.model import gradnorm_lorp_modules
from velora.optim._common import check_positive
from velora.optim.galore import GaLoreAdamW
from velora.optim.projections import trainable_except

__all__ = ["gradnorm_lorp_optimizer"]


def gradnorm_lorp_optimizer(
    model: nn.Module,
    lr: float,
    proj_rank: int,
    update_proj_gap: int = 250,
    scale: float = 0.25,
    eight_bit: bool = False,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    reproject_moments: bool = False,
) -> GaLoreAdamW:
    """A ``GaLoreAdamW`` over ``model``'s trainable parameters with the GradNormLoRP factors projected."""
    check_positive("proj_rank", proj_rank)
    modules = gradnorm_lorp_modules(model)
    if not modules:
        raise ValueError("gradnorm_lorp_optimizer: the model has no GradNormLoRP layers; "
                         "call velora.apply_gradnorm_lorp(model, config) first")
    factors = []
    for name, module in modules.items():
        if proj_rank >= module.rank:
            raise ValueError(f"proj_rank={proj_rank} >= GradNormLoRP rank={module.rank} of {name!r}: the "
                             f"projection would not compress; pick proj_rank < {module.rank}")
        factors += [p for p in (module.lora_I, module.lora_J) if p.requires_grad]
    others = trainable_except(model, factors)
    groups = [dict(params=factors, rank=proj_rank, update_proj_gap=update_proj_gap, scale=scale,
                   proj_type="std", reproject_moments=reproject_moments)]
    if others:
        groups.append(dict(params=others))
    return GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eight_bit=eight_bit)
