"""``LoRAConfig``: the options of the peft-backed methods lora, dora and qlora."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from velora.methods.common import ConfigBase, check_int, check_number, option


@dataclass
class LoRAConfig(ConfigBase):
    """rank, alpha, dropout: peft's r, lora_alpha, lora_dropout. targets: peft's target_modules.
    unfreeze: names (substrings) of non-adapter parameters that stay trainable, e.g. ("embed_tokens", "norm",
    "lm_head") when pre-training from scratch. compute_dtype (qlora only): dtype of the NF4 layers' matmuls,
    auto = the model's weight dtype."""

    section = "lora"  # options.lora
    prefix = "lora"
    rank: int = option(8, "LoRA/DoRA rank (default 8)")
    alpha: float = option(16.0, "LoRA/DoRA alpha (default 16)")
    dropout: float = option(0.0, "LoRA dropout (default 0; >0 keeps a full-size mask)")
    targets: Any = option("all-linear", "", flag="")
    unfreeze: tuple[str, ...] = option((), "", flag="")
    compute_dtype: str = option("auto", "QLoRA compute dtype: auto | float32 | bfloat16 | float16 (default auto)",
                                key="qlora_compute_dtype")

    def __post_init__(self) -> None:
        check_int("lora_rank", self.rank)
        check_number("lora_alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora_dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.unfreeze, str) or not all(isinstance(name, str) for name in self.unfreeze):
            raise ValueError(f"lora_unfreeze={self.unfreeze!r} must be a list of parameter-name substrings")
        self.unfreeze = tuple(self.unfreeze)
        from velora.methods.lora.qlora import COMPUTE_DTYPES

        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"qlora_compute_dtype={self.compute_dtype!r} is unknown; choose one of "
                             f"{list(COMPUTE_DTYPES)}")
