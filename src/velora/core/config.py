"""`VeLoRAConfig`: a validated, versioned, JSON-serialisable description of where and how to compress.

Target presets know the usual module names of the architectures the paper trains: the paper applies
VeLoRA to the value projection and the MLP down projection (velora-paper §4.1).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from velora.core.subtoken import COEFFICIENT_BITS, COEFFICIENT_SCALES, CoefficientFormat

CONFIG_VERSION = 1

INIT_STRATEGIES = ("batch_average_once", "ema", "random", "svd")
MODES = ("auto", "full", "adapter")

# Regexes matched (re.fullmatch) against a module's qualified name. "Value + MLP down projection", per family,
# checked against the module trees of the installed transformers (tests/test_presets.py).
PAPER_TARGETS: dict[str, tuple[str, ...]] = {
    # LLaMA, Mistral, Qwen2, Gemma, OPT: self_attn.v_proj; LLaMA-style MLP down_proj (also Phi-3's)
    "llama": (r"(.*\.)?self_attn\.v_proj", r"(.*\.)?mlp\.down_proj"),
    # Phi-3 and GPT-NeoX fuse q, k and v into one linear (qkv_proj / query_key_value), GPT-2 into one Conv1D
    # (attn.c_attn): compressing it would also change the q/k weight gradients, so these take the MLP down
    # projection only (documented choice). Phi-3's down_proj is matched by the "llama" entry.
    "gpt2": (r"(.*\.)?mlp\.c_proj",),
    "gpt_neox": (r"(.*\.)?mlp\.dense_4h_to_h",),
    # OPT: the MLP down projection is fc2, directly under the decoder layer
    "opt": (r"(.*\.)?layers\.\d+\.fc2",),
    # RoBERTa / BERT: attention.self.value and the FFN output dense (not attention.output.dense)
    "bert": (r"(.*\.)?attention\.self\.value", r"(.*\.)?layer\.\d+\.output\.dense"),
    # ViT: transformers 5 names them attention.v_proj and mlp.fc2; transformers 4 attention.attention.value and
    # layer.N.output.dense (kept for models built with it); timm's fused qkv leaves mlp.fc2
    "vit": (r"(.*\.)?attention\.v_proj", r"(.*\.)?mlp\.fc2", r"(.*\.)?attention\.attention\.value"),
    # T5: the value projections of self- and cross-attention and the feed-forward output wo
    "t5": (r"(.*\.)?(SelfAttention|EncDecAttention)\.v", r"(.*\.)?DenseReluDense\.wo"),
}


def paper_target_patterns() -> tuple[str, ...]:
    return tuple(p for patterns in PAPER_TARGETS.values() for p in patterns)


@dataclass
class VeLoRAConfig:
    """How VeLoRA compresses the input of the targeted linear layers.

    Exactly one of ``sub_token_size`` (M, the paper's knob) and ``num_groups`` (D/M, peft's spelling)
    is given. ``init`` is one of ``INIT_STRATEGIES`` or a tensor of shape (M,) or (M, rank). ``coefficient_bits``
    (8 or 4) keeps the coefficients z as integers of that many bits with one scale per token instead of in x's
    dtype: at the paper's bytes in fp32, 8 bits buy rank = M (every sub-token kept whole, up to rounding).
    ``coefficient_scales`` ("token_and_column", the default, or "token") says whether each coefficient is first
    divided by its RMS over the batch's tokens (G·r more numbers per forward), which keeps the step fine on
    features that are large on every token (the outlier channels of pretrained LLMs; "token" alone lets them
    coarsen every other coefficient: ``benchmarks/bench_coefficient_outliers.py``).
    """

    sub_token_size: int | None = None
    num_groups: int | None = None
    rank: int = 1
    init: Any = "batch_average_once"
    ema_decay: float = 0.99
    seed: int = 0
    svd_max_samples: int = 4096
    target_modules: Any = "paper"
    scale: float = 1.0
    pad: bool = False
    mode: str = "auto"
    sync_across_ranks: bool = True
    fuse_lora: bool = True
    per_group_directions: bool = False
    reestimate_every: int | None = None
    coefficient_bits: int | None = None
    coefficient_scales: str = COEFFICIENT_SCALES[0]
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        if self.sub_token_size is None and self.num_groups is None:
            self.sub_token_size = 32
        if self.sub_token_size is not None and self.num_groups is not None:
            raise ValueError(
                f"give one of sub_token_size={self.sub_token_size} and num_groups={self.num_groups}, not both"
            )
        for name in ("sub_token_size", "num_groups"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be an integer >= 1 (1 is the paper's rank-1 projection)")
        if isinstance(self.init, torch.Tensor):
            if self.init.dim() not in (1, 2) or not torch.isfinite(self.init).all():
                raise ValueError(
                    f"init tensor of shape {tuple(self.init.shape)} must be finite with shape (M,) or (M, rank)"
                )
        elif self.init not in INIT_STRATEGIES:
            raise ValueError(f"init={self.init!r} is unknown; choose one of {INIT_STRATEGIES} or pass a tensor")
        if self.init == "ema" and self.rank != 1:
            raise ValueError(f"init='ema' tracks one running mean, so it needs rank=1 (got rank={self.rank}); "
                             "use init='svd' or 'batch_average_once' for rank > 1")
        if not (0.0 <= float(self.ema_decay) < 1.0):
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if self.svd_max_samples < self.rank:
            raise ValueError(f"svd_max_samples={self.svd_max_samples} must be >= rank={self.rank}")
        if not math.isfinite(float(self.scale)) or float(self.scale) == 0.0:
            raise ValueError(f"scale={self.scale} must be a finite non-zero number")
        self._check_reestimate_every()
        bits = self.coefficient_bits
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or bits not in COEFFICIENT_BITS):
            raise ValueError(f"coefficient_bits={bits!r} must be None (z kept in the input's dtype, the paper) or one "
                             f"of {COEFFICIENT_BITS} (z rounded to that many bits, one scale per token)")
        if self.coefficient_scales not in COEFFICIENT_SCALES:
            raise ValueError(f"coefficient_scales={self.coefficient_scales!r} must be one of {COEFFICIENT_SCALES}")
        if bits is None and self.coefficient_scales != COEFFICIENT_SCALES[0]:
            raise ValueError(f"coefficient_scales={self.coefficient_scales!r} applies only to quantised coefficients;"
                             " set coefficient_bits=8 or 4, or drop coefficient_scales")
        for name in ("pad", "sync_across_ranks", "fuse_lora", "per_group_directions"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; choose one of {MODES}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"VeLoRAConfig version={self.version} is not supported by this release "
                             f"(expects {CONFIG_VERSION}); upgrade velora-torch")
        self.target_modules = _normalise_targets(self.target_modules)

    def _check_reestimate_every(self) -> None:
        every = self.reestimate_every
        if every is None:
            return
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"reestimate_every={every!r} must be a positive integer (training forwards between "
                             "re-estimates of v) or None (v fixed after the first batch)")
        if isinstance(self.init, torch.Tensor) or self.init not in ("batch_average_once", "svd"):
            init = "a tensor" if isinstance(self.init, torch.Tensor) else repr(self.init)
            raise ValueError(f"reestimate_every={every} re-estimates v from data, but init={init} does not build v "
                             "from data that way; use init='batch_average_once' or 'svd' (or reestimate_every=None)")

    # ---- targets -------------------------------------------------------------------------------
    def target_patterns(self) -> tuple[str, ...]:
        """Regex patterns (fullmatch against qualified module names)."""
        patterns: list[str] = []
        for target in self.target_modules:
            if target == "paper":
                patterns.extend(paper_target_patterns())
            elif target.startswith("re:"):
                patterns.append(target[3:])
            else:
                # a plain name matches itself or any module whose name ends with ".<name>"
                patterns.append(r"(.*\.)?" + re.escape(target))
        return tuple(patterns)

    def matches(self, module_name: str) -> bool:
        return any(re.fullmatch(p, module_name) for p in self.target_patterns())

    def sub_token_size_for(self, in_features: int, module_name: str = "") -> int:
        """M for a layer with ``in_features`` inputs (validated against D and ``pad``)."""
        where = f" of {module_name!r}" if module_name else ""
        if self.num_groups is not None:
            if in_features % self.num_groups and not self.pad:
                raise ValueError(
                    f"num_groups={self.num_groups} does not divide in_features={in_features}{where}; "
                    "pick a divisor or set pad=True"
                )
            size = math.ceil(in_features / self.num_groups)
        else:
            size = int(self.sub_token_size)  # type: ignore[arg-type]
            if size > in_features:
                raise ValueError(f"sub_token_size={size} is larger than in_features={in_features}{where}; "
                                 "pick a divisor of in_features")
            if in_features % size and not self.pad:
                raise ValueError(
                    f"sub_token_size={size} does not divide in_features={in_features}{where}; "
                    "pick a divisor or set pad=True"
                )
        if size < self.rank:
            raise ValueError(f"rank={self.rank} exceeds sub_token_size={size}{where}; use rank <= sub_token_size")
        return size

    def coefficient_format(self) -> CoefficientFormat | None:
        """How the ops keep z: None (in x's dtype, the paper) or the bits and scale layout."""
        if self.coefficient_bits is None:
            return None
        return CoefficientFormat(self.coefficient_bits, self.coefficient_scales == "token_and_column")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        if isinstance(self.init, torch.Tensor):
            data["init"] = {"tensor": self.init.detach().double().cpu().tolist()}
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VeLoRAConfig:
        reject_unknown_keys(cls, data)
        data = dict(data)
        if isinstance(data.get("init"), dict) and "tensor" in data["init"]:
            data["init"] = torch.tensor(data["init"]["tensor"], dtype=torch.float32)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> VeLoRAConfig:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VeLoRAConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()


def reject_unknown_keys(cls: type, data: dict[str, Any]) -> None:
    """One-line ValueError if ``data`` (a saved dataclass) has keys that ``cls`` does not know."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")


def _normalise_targets(targets: Any) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"target_modules={targets!r} must be a non-empty name, list of names, 're:<regex>' or 'paper'")
    out = []
    for target in targets:
        if not isinstance(target, str) or not target:
            raise ValueError(f"target_modules entry {target!r} must be a non-empty string")
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as err:
                raise ValueError(f"target_modules regex {target!r} does not compile ({err}); fix the pattern") from None
        out.append(target)
    return tuple(out)
