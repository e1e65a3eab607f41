"""``flora``: FLoRA compressed momentum (velora.optim.Flora) on an AdamW or Adafactor base. The compressed
gradient accumulation of ``FloraConfig.accumulation`` is built by the training loop / HF trainer
(``compressed_accumulator``), since it wraps the backward passes, not the optimizer."""

from __future__ import annotations

from torch import nn

from velora.methods.common import DEFAULT_BETAS
from velora.methods.flora.config import FloraConfig
from velora.methods.options import MethodOptions
from velora.methods.registry import BaseMethod, keep_model, register


def flora_optimizer(model: nn.Module, options: MethodOptions):
    from velora.optim import Flora
    from velora.optim.projections import projectable_parameters

    config, settings = options.flora, options.optim
    beta1, beta2 = settings.betas
    if settings.name == "adafactor" and (beta2 != DEFAULT_BETAS[1] or settings.eps is not None):
        raise ValueError(f"betas[1]={beta2} / eps={settings.eps} do not apply to FLoRA's Adafactor base (its second "
                         "moment decays by beta2_decay); keep beta2=0.999, no eps, or use optimizer='adamw'")
    extra = {"eps": settings.eps} if settings.eps is not None else {}
    if config.eps1 is not None:
        if settings.name != "adafactor":
            raise ValueError(f"flora_eps1={config.eps1} applies to FLoRA's Adafactor base only; use "
                             "optimizer='adafactor' or drop flora_eps1")
        extra["eps1"] = config.eps1
    # pass the model, not a parameter list: Flora then compresses only attention/MLP matrices and keeps
    # embeddings and the head uncompressed (a vocabulary-wide random projection stalls training)
    return Flora(model, lr=settings.lr, rank=config.rank_for(projectable_parameters(model)), kappa=config.kappa,
                 beta1=beta1, beta2=beta2, weight_decay=settings.weight_decay, base=settings.name,
                 seed=options.seed, project=config.project, momentum=config.momentum,
                 exact_current=config.exact_current, orthogonal=config.momentum_orthogonal,
                 residual=config.momentum_residual, **extra)


def compressed_accumulator(model_or_params, options: MethodOptions, accumulation_steps: int):
    """The FLoRA compressed gradient accumulator (``FloraConfig.accumulation``) over the projectable matrices
    of a model (or the given matrices), with the config's rank, rows and side."""
    from velora.optim import CompressedGradAccumulator
    from velora.optim.projections import projectable_parameters

    params = projectable_parameters(model_or_params) if isinstance(model_or_params, nn.Module) \
        else list(model_or_params)
    config = options.flora
    return CompressedGradAccumulator(model_or_params, rank=config.rank_for(params),
                                     accumulation_steps=accumulation_steps, seed=options.seed,
                                     orthogonal=config.orthogonal, project=config.project)


def sized_flora(rank: int, refresh_interval: int) -> dict:
    return {"flora_rank": rank, "flora_kappa": refresh_interval}


register(BaseMethod("flora", "FLoRA compressed momentum (Adafactor or AdamW base)", keep_model, flora_optimizer,
                    optimizers=("adafactor", "adamw"), sized=sized_flora, config=FloraConfig))
