"""``lora``, ``dora`` (peft adapters) and ``qlora`` (an NF4 frozen base under peft LoRA): model preparation
from ``LoRAConfig``; the optimizer is the standard one over the trainable parameters."""

from __future__ import annotations

from torch import nn

from velora.methods.full.method import all_parameters_optimizer
from velora.methods.lora.config import LoRAConfig
from velora.methods.options import MethodOptions
from velora.methods.registry import BaseMethod, register


def add_peft_adapters(model: nn.Module, config: LoRAConfig, use_dora: bool) -> nn.Module:
    """peft LoRA (or DoRA) on ``config.targets``; parameters named in ``config.unfreeze`` train too."""
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=config.targets, use_dora=use_dora, bias="none")
    model = get_peft_model(model, peft_config)
    for name, param in model.named_parameters():
        if any(key in name for key in config.unfreeze):
            param.requires_grad_(True)
    return model


def prepare_lora(model: nn.Module, options: MethodOptions) -> nn.Module:
    return add_peft_adapters(model, options.lora, use_dora=False)


def prepare_dora(model: nn.Module, options: MethodOptions) -> nn.Module:
    return add_peft_adapters(model, options.lora, use_dora=True)


def prepare_qlora(model: nn.Module, options: MethodOptions) -> nn.Module:
    from velora.methods.lora.qlora import quantize_base_linears

    quantize_base_linears(model, options.lora.compute_dtype)  # frozen base -> bitsandbytes NF4 Linear4bit
    return add_peft_adapters(model, options.lora, use_dora=False)  # peft wraps each Linear4bit with its bnb layer


def sized_lora(rank: int, refresh_interval: int) -> dict:
    """Rank r, alpha = r; pre-training from scratch, so embeddings, norms and the head train too."""
    return {"lora_rank": rank, "lora_alpha": float(rank), "lora_unfreeze": ["embed_tokens", "norm", "lm_head"]}


register(BaseMethod("lora", "peft LoRA adapters on all linear layers", prepare_lora, all_parameters_optimizer,
                    sized=sized_lora, config=LoRAConfig))
register(BaseMethod("dora", "peft DoRA adapters on all linear layers", prepare_dora, all_parameters_optimizer,
                    sized=sized_lora, config=LoRAConfig))
register(BaseMethod("qlora", "bitsandbytes NF4 frozen base (double quantisation) + peft LoRA", prepare_qlora,
                    all_parameters_optimizer, sized=sized_lora, config=LoRAConfig))
