"""Model presets built from transformers configs (random init; nothing is downloaded).

A preset is a family ("llama", "gpt2", "roberta", "vit") plus config keyword arguments. The C4
pre-training sizes follow the configs used by GaLore/VeLoRA/GradNormLoRP (vocab 32000, seq 1024).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from velora.training.config import TrainConfig


@dataclass(frozen=True)
class Preset:
    family: str  # the transformers model_type
    kwargs: dict[str, Any] = field(default_factory=dict)


def _llama(hidden: int, intermediate: int, heads: int, layers: int, vocab: int = 32000, seq: int = 1024) -> Preset:
    return Preset(
        "llama",
        dict(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            num_hidden_layers=layers,
            vocab_size=vocab,
            max_position_embeddings=seq,
            tie_word_embeddings=False,
        ),
    )


PRESETS: dict[str, Preset] = {
    # CPU-sized models for tests, demos and the `velora compare` job
    "llama-tiny": _llama(64, 192, 4, 2, vocab=512, seq=256),
    "llama-small": _llama(128, 352, 4, 4, vocab=2048, seq=256),
    "llama-20m": _llama(256, 704, 4, 4, vocab=8192, seq=512),
    # the usual C4 pre-training sizes
    "llama-60m": _llama(512, 1376, 8, 8),
    "llama-130m": _llama(768, 2048, 12, 12),
    "llama-350m": _llama(1024, 2736, 16, 24),
    "llama-1b": _llama(2048, 5461, 32, 24),
    "llama-7b": _llama(4096, 11008, 32, 32, seq=2048),
    "llama-13b": _llama(5120, 13824, 40, 40, seq=2048),
    "gpt2": Preset("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "roberta-base": Preset(
        "roberta",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             vocab_size=50265, max_position_embeddings=514, type_vocab_size=1),
    ),
    "vit-base": Preset(
        "vit",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             image_size=224, patch_size=16, num_channels=3),
    ),
}

# one dtype spelling accepted by every command: the torch name or the short one
DTYPE_SPELLINGS = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                   "float16": "float16", "fp16": "float16"}


def canonical_dtype(name: str, supported: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> str:
    """The torch name (``float32`` / ``bfloat16`` / ``float16``) of ``name`` (``fp32``, ``bf16`` ... too)."""
    canonical = DTYPE_SPELLINGS.get(str(name).lower())
    if canonical not in supported:
        spellings = ", ".join(k for k, v in DTYPE_SPELLINGS.items() if v in supported)
        raise ValueError(f"dtype={name!r} is not supported here; choose one of {spellings}")
    return canonical


def build_config(name_or_path: str, **overrides: Any):
    """A transformers config from a preset name, a config.json path, or a directory holding one."""
    import transformers

    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        kwargs = {**preset.kwargs, **overrides}
        return transformers.AutoConfig.for_model(preset.family, **kwargs)
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if path.endswith(".json"):
        if not os.path.exists(path):
            raise FileNotFoundError(f"model config {path!r} does not exist; pass a preset ({', '.join(PRESETS)}) "
                                    "or a path to a config.json")
        data = _read_config_json(path)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{path!r} has no 'model_type'; add e.g. \"model_type\": \"llama\"")
        if model_type not in transformers.CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(transformers.CONFIG_MAPPING), n=3)
            raise ValueError(f"{path!r} has model_type={str(model_type)[:60]!r}, which transformers "
                             f"{transformers.__version__} does not know; close names: {close or 'none'} "
                             "(e.g. llama, gpt2, mistral)")
        data.update(overrides)
        return transformers.AutoConfig.for_model(model_type, **data)
    raise ValueError(f"unknown model {name_or_path!r}; choose a preset ({', '.join(PRESETS)}) "
                     "or a path to a config.json / model directory")


def _read_config_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"model config {path!r} is not valid JSON ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path!r} holds a JSON {type(data).__name__}, not an object; fix the file")
    return data


def model_family(config) -> str:
    """The transformers ``model_type`` of a config (a preset's family is its model type)."""
    return config.model_type


def build_model(config, dtype=None):
    """A randomly initialised model for a config: causal LM for decoders, masked LM for RoBERTa/BERT,
    image classifier for ViT."""
    import transformers

    family = model_family(config)
    if family in ("roberta", "bert"):
        cls = transformers.AutoModelForMaskedLM
    elif family == "vit":
        cls = transformers.AutoModelForImageClassification
    else:
        cls = transformers.AutoModelForCausalLM
    model = cls.from_config(config)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model.train()
    return model


def _is_pretrained_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists() and any(
        (p / name).exists() for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


def build_base_model(config: TrainConfig, vocab_size: int) -> nn.Module:
    """A preset / config.json built with random init, or a pretrained model via ``from_pretrained``."""
    dtype = getattr(torch, config.dtype)
    if config.model in PRESETS or config.model.endswith(".json") or (
            Path(config.model).is_dir() and not _is_pretrained_dir(config.model)):
        overrides: dict[str, Any] = {"vocab_size": vocab_size}
        model_config = build_config(config.model, **overrides)
        if getattr(model_config, "max_position_embeddings", config.seq_len) < config.seq_len:
            model_config.max_position_embeddings = config.seq_len
        return build_model(model_config, dtype=None if dtype == torch.float32 else dtype)
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    except (OSError, ValueError) as err:  # transformers' unknown-model_type message lists every type: cut it
        raise ValueError(f"--model {config.model!r} is not a preset, config.json or loadable model "
                         f"({str(err).splitlines()[0][:200]}); pass a preset or a local model directory") from None
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(f"--model {config.model!r} has {model.get_input_embeddings().num_embeddings} embeddings "
                         f"but the tokenizer has {vocab_size} ids; use --tokenizer model")
    model.train()
    return model
