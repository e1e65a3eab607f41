"""``gradnormlorp``: the weight-normalised LoRA reparameterisation (``model.apply_gradnorm_lorp``) trained by
the projected-gradient optimizer (velora.optim.gradnorm_lorp_optimizer)."""

from __future__ import annotations

from torch import nn

from velora.methods.gradnorm_lorp.config import GradNormLoRPMethodConfig
from velora.methods.options import MethodOptions
from velora.methods.registry import BaseMethod, register


def prepare_gradnorm_lorp(model: nn.Module, options: MethodOptions) -> nn.Module:
    from velora.methods.gradnorm_lorp.model import apply_gradnorm_lorp

    return apply_gradnorm_lorp(model, options.gradnorm_lorp.model_config())


def gradnorm_lorp_method_optimizer(model: nn.Module, options: MethodOptions):
    from velora.optim import gradnorm_lorp_optimizer

    config, settings = options.gradnorm_lorp, options.optim
    return gradnorm_lorp_optimizer(model, proj_rank=config.proj_rank, update_proj_gap=config.update_proj_gap,
                                   scale=config.scale, eight_bit=settings.name == "adamw8bit",
                                   **settings.adam_kwargs())


def sized_gradnorm_lorp(rank: int, refresh_interval: int) -> dict:
    """LoRA rank r, alpha = r, projection rank r/2, SVD refresh T."""
    return {"gradnorm_rank": rank, "gradnorm_alpha": float(rank), "gradnorm_proj_rank": rank // 2,
            "gradnorm_update_proj_gap": refresh_interval, "gradnorm_scale": 0.25}


register(BaseMethod("gradnormlorp", "weight-normalised LoRA with projected factor gradients", prepare_gradnorm_lorp,
                    gradnorm_lorp_method_optimizer, optimizers=("adamw", "adamw8bit"), sized=sized_gradnorm_lorp,
                    config=GradNormLoRPMethodConfig))
