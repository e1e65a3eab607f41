"""``TrainConfig``: everything that determines a run's numbers, and the learning-rate schedule it implies."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from velora.core.config import VeLoRAConfig, reject_unknown_keys
from velora.methods.options import MethodOptions, option_keys
from velora.methods.registry import parse_method

# MethodOptions keys a TrainConfig holds as its own fields, never in ``options``
TOP_LEVEL_FIELDS = ("lr", "weight_decay")


@dataclass
class TrainConfig:
    """Everything that determines a run's numbers. Saved as ``config.json``; ``--resume`` checks it."""

    method: str = "full"
    model: str = "llama-tiny"
    data: str = "stdlib"
    tokenizer: str = "bpe"  # bpe | byte | path to tokenizer.json | model (the pretrained model's own)
    vocab_size: int = 2048  # BPE vocabulary (ignored by byte / pretrained tokenizers)
    bpe_train_chars: int = 1_000_000
    max_train_chars: int | None = 3_000_000
    max_val_chars: int | None = 300_000
    val_fraction: float = 0.05
    seq_len: int = 128
    batch_size: int = 8
    accumulation_steps: int = 1
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    eval_batches: int = 8  # validation batches per evaluation; 0: the whole validation split
    eval_every: int = 0  # 0: evaluate at the end only
    save_every: int = 0  # 0: checkpoint at the end only
    init_from: str | None = None  # a run / checkpoint folder of any method to start from (fine-tuning)
    dtype: str = "float32"
    # method options by flat key (velora.methods.options.OPTION_KEYS: lora_rank, flora_kappa, betas, ...) and the
    # VeLoRA config, as plain JSON
    options: dict[str, Any] = field(default_factory=dict)
    velora: dict[str, Any] = field(default_factory=lambda: {"sub_token_size": 32, "target_modules": "paper"})

    def __post_init__(self) -> None:
        parse_method(self.method)  # one-line error for unknown methods
        # JSON-normalise (tuples -> lists) so a config read back from config.json compares equal
        self.options = json.loads(json.dumps(self.options))
        self.velora = json.loads(json.dumps(self.velora))
        for name in ("seq_len", "batch_size", "accumulation_steps", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 0:
            raise ValueError(f"eval_batches={self.eval_batches!r} must be a positive integer, or 0 for the whole "
                             "validation split")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr={self.lr} must be a positive finite number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        from velora.training.models import canonical_dtype

        self.dtype = canonical_dtype(self.dtype, ("float32", "bfloat16"))  # bf16 / fp32 spellings too
        known = sorted(set(option_keys()) - set(TOP_LEVEL_FIELDS))
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise ValueError(f"unknown method option(s) {unknown}; known: {known} (lr, weight_decay, seed and "
                             "accumulation_steps are TrainConfig fields)")
        self.method_options()  # validate every value now, in one line, not when training starts

    def velora_config(self) -> VeLoRAConfig:
        return VeLoRAConfig.from_dict(self.velora)

    def method_options(self) -> MethodOptions:
        """The ``MethodOptions`` of this run: ``options`` (flat keys) with this config's lr, weight decay, seed,
        accumulation steps and VeLoRA config."""
        top = {"lr": self.lr, "weight_decay": self.weight_decay, "seed": self.seed,
               "accumulation_steps": self.accumulation_steps, "velora": self.velora_config()}
        return MethodOptions.from_flat({**self.options, **top})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        reject_unknown_keys(cls, data)
        return cls(**data)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio``; a pure function of the step."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
