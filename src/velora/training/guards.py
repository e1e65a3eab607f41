"""Checks the training loop runs before and while it trains, each ending in one line that says what to do.

* ``check_model_spec``: a ``--model`` that is neither a preset, an existing path nor a hub id
  (``org/name``) is refused at once, listing the presets (no hub call, no retries).
* ``check_memory_fits``: the planned peak of one training step (``velora.memory.plan`` on fake tensors,
  nothing allocated) against the memory available (CPU: MemAvailable and the cgroup limit; CUDA:
  ``torch.cuda.mem_get_info``), before the model is built.
* ``DivergenceRule``: the documented rule that stops a loss that explodes but stays finite, and
  ``TrainingDiverged``, the error that ends such a run (``after_divergence`` says what to do next).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from pathlib import Path
from typing import Any

import torch

from velora.training.resume import checkpoint_step

# ---- --model --------------------------------------------------------------------------------------


def check_model_spec(model: str) -> None:
    """Refuse a ``--model`` that cannot be a preset, a local path or a hub id, before anything is loaded."""
    from velora.training.models import PRESETS

    if model in PRESETS or os.path.exists(model):
        return
    presets = ", ".join(PRESETS)
    looks_like_path = model.endswith(".json") or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"--model {model!r} does not exist; pass an existing config.json / model folder "
                                f"or a preset ({presets})")
    if "/" not in model:
        close = difflib.get_close_matches(model, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"--model {model!r} is not a preset; {hint}presets: {presets}; or pass a config.json, a "
                         "local model folder, or a hub id as org/name")


# ---- memory ---------------------------------------------------------------------------------------


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes the step may use, where that figure comes from), or None when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device} (torch.cuda.mem_get_info)"
    figures = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except OSError:
        try:
            import psutil

            figures.append((int(psutil.virtual_memory().available), "available RAM (psutil)"))
        except ImportError:
            pass
    cgroup = _cgroup_available()
    if cgroup is not None:
        figures.append((cgroup, "left under the cgroup memory limit"))
    return min(figures) if figures else None


def _model_config(config, vocab_size: int):
    """The transformers config ``train`` will build, or None for a hub model (not looked up)."""
    from velora.training.models import PRESETS

    if config.model in PRESETS or config.model.endswith(".json") or Path(config.model).is_dir():
        return _built_config(config.model, _vocabulary(config, vocab_size), config.seq_len)
    return None


def _vocabulary(config, vocab_size: int) -> int | None:
    """The vocabulary size the built model gets: the tokenizer's, or None when the model keeps its own."""
    return None if config.tokenizer == "model" else vocab_size


def _built_config(model: str, vocab_size: int | None, seq_len: int):
    from velora.training.models import build_config

    model_config = build_config(model, **({} if vocab_size is None else {"vocab_size": vocab_size}))
    if getattr(model_config, "max_position_embeddings", seq_len) < seq_len:
        model_config.max_position_embeddings = seq_len
    return model_config


def parameter_count(model_config) -> int:
    """The number of parameters of the model ``model_config`` builds (on the meta device: no memory)."""
    with torch.device("meta"):
        from velora.training.models import build_model

        return sum(p.numel() for p in build_model(model_config).parameters())


def model_size(model_config) -> tuple[int, int, int, int]:
    """(parameters, hidden size, layers, vocabulary size) of the model ``model_config`` builds."""
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 1024)
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", 12)
    return parameter_count(model_config), hidden, layers, getattr(model_config, "vocab_size", 32000)


@functools.lru_cache(maxsize=64)
def _preset_size(model: str, vocab_size: int | None, seq_len: int) -> tuple[int, int, int, int]:
    """``model_size`` of a preset, measured once per process: building a config and a meta model costs ~0.2 s, which
    a process training many small runs (a bench, compare, the tests) would pay before every run."""
    return model_size(_built_config(model, vocab_size, seq_len))


def _size(config, vocab_size: int) -> tuple[int, int, int, int] | None:
    """``model_size`` of the model ``train`` will build (presets cached; config files read each time, as they may
    change), or None for a hub model."""
    from velora.training.models import PRESETS

    if config.model in PRESETS:
        return _preset_size(config.model, _vocabulary(config, vocab_size), config.seq_len)
    model_config = _model_config(config, vocab_size)
    return None if model_config is None else model_size(model_config)


def rough_step_bytes(size: tuple[int, int, int, int], batch: int, seq: int, bytes_per_value: int) -> int:
    """A generous estimate from ``model_size`` (weights, gradients and two optimizer moments, plus ~40 saved values
    per hidden unit per layer and the logits thrice): below a quarter of the available memory, planning is skipped."""
    n_params, hidden, layers, vocab = size
    return bytes_per_value * (4 * n_params + batch * seq * (40 * hidden * layers + 3 * vocab))


def _plan_options(config) -> tuple[str, dict[str, Any]]:
    options = dict(config.options)
    optimizer = options.pop("optimizer", "adamw")
    velora = {k: v for k, v in config.velora.items() if k != "version"}
    options.update({f"velora_{k}": v for k, v in velora.items()})
    return optimizer, options


def check_memory_fits(config, vocab_size: int, device: torch.device, say) -> None:
    """Refuse a run whose planned training-step peak exceeds the memory available on ``device``."""
    available = available_memory(device)
    if available is None:
        say("memory pre-check skipped: the available memory is unknown on this system")
        return
    free_bytes, source = available
    size = _size(config, vocab_size)
    if size is None:
        say(f"memory pre-check skipped for hub model {config.model!r} (its config is not fetched to plan it)")
        return
    from velora.methods.registry import parse_method

    bytes_per_value = 2 if config.dtype == "bfloat16" else 4
    n_params = size[0]
    gib = 2**30
    weights = n_params * bytes_per_value  # a lower bound of any step's peak, unless the weights are quantised
    if weights > free_bytes and parse_method(config.method).base != "qlora":  # no need to plan a step
        raise ValueError(f"--model {config.model} --method {config.method} needs {weights / gib:.1f} GiB for its "
                         f"{config.dtype} weights alone ({n_params / 1e9:.2f} B parameters; a step needs more) but "
                         f"{free_bytes / gib:.1f} GiB is {source}; use a smaller model, --method qlora, "
                         "or --ignore-memory-check")
    if rough_step_bytes(size, config.batch_size, config.seq_len, bytes_per_value) < free_bytes / 4:
        return
    from velora.memory.planner import plan

    optimizer, options = _plan_options(config)
    try:
        planned = plan(_model_config(config, vocab_size), config.method, optimizer, batch=config.batch_size,
                       seq=config.seq_len, dtype="bf16" if config.dtype == "bfloat16" else "fp32", **options)
    except Exception as err:  # noqa: BLE001 - a planner gap must not block training; it is reported
        say(f"memory pre-check skipped: planning failed ({type(err).__name__}: {str(err)[:160]})")
        return
    peak = planned["peak_bytes"]
    if peak > free_bytes:
        raise ValueError(f"--model {config.model} --method {config.method} needs a planned peak of "
                         f"{peak / gib:.1f} GiB per step (batch {config.batch_size} x seq {config.seq_len}, "
                         f"{config.dtype}) but {free_bytes / gib:.1f} GiB is {source}; use a smaller model, batch "
                         "or --seq-len, a memory-saving --method (see velora plan), or --ignore-memory-check")


# ---- divergence -----------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint is kept."""


DIVERGENCE_MARGIN_NATS = 2.0
DIVERGENCE_PATIENCE = 3


class DivergenceRule:
    """Diverged: the training loss stays above ``ceiling`` for ``DIVERGENCE_PATIENCE`` consecutive steps, or a
    validation loss is above it (or not finite). ``ceiling = max(ln V, first loss of this run) + 2 nats``:
    a model that predicts worse than uniform guessing over the V token ids, by a factor e² ≈ 7.4 in
    perplexity, is not learning. Short spikes (fewer than ``DIVERGENCE_PATIENCE`` steps) are tolerated."""

    def __init__(self, vocab_size: int) -> None:
        self.uniform_loss = math.log(vocab_size)
        self.ceiling: float | None = None
        self.steps_above = 0
        self.first_step_above: int | None = None  # first step of the current run of losses above the ceiling

    def _ceiling(self, loss: float) -> float:
        if self.ceiling is None:
            self.ceiling = max(self.uniform_loss, loss) + DIVERGENCE_MARGIN_NATS
        return self.ceiling

    def train_loss(self, step: int, loss: float) -> str | None:
        """A message when the rule fires at this step, else None."""
        ceiling = self._ceiling(loss)
        self.steps_above = self.steps_above + 1 if loss > ceiling else 0
        if self.steps_above == 1:
            self.first_step_above = step
        elif self.steps_above == 0:
            self.first_step_above = None
        if self.steps_above >= DIVERGENCE_PATIENCE:
            return (f"loss {loss:.4g} at step {step} has stayed above {ceiling:.3f} (uniform guessing "
                    f"ln V = {self.uniform_loss:.3f} + {DIVERGENCE_MARGIN_NATS:g}) for {self.steps_above} steps")
        return None

    def validation_loss(self, step: int, loss: float) -> str | None:
        ceiling = self.ceiling if self.ceiling is not None else self.uniform_loss + DIVERGENCE_MARGIN_NATS
        if not math.isfinite(loss) or loss > ceiling:
            return f"validation loss {loss:.4g} at step {step} is above {ceiling:.3f} (or not finite)"
        return None


def after_divergence(kept: Path | None, divergence: DivergenceRule, lr: float) -> str:
    """Where the run stands after a divergence, and what to do next."""
    rose = divergence.first_step_above
    if kept is not None and rose is not None and checkpoint_step(kept) >= rose - 1:
        # the weights after step rose - 1 already gave the loss above the ceiling
        return (f"the latest checkpoint {kept} holds weights from after the loss rose (step {rose}); start over "
                f"with a lower --lr (now {lr}) or more --warmup-steps")
    where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written"
    return (f"{where}. Lower --lr (now {lr}) or raise --warmup-steps, then "
            + ("continue with --resume --allow-lr-change (other arguments unchanged) or start over" if kept
               else "start over"))


def gradient_norm(params: list[torch.nn.Parameter], clip: float) -> float:
    """The total gradient norm of ``params`` (clipped to ``clip`` when > 0); under FSDP2 the norm of the whole
    gradients (torch reduces the DTensor shards)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if clip > 0:
        total = torch.nn.utils.clip_grad_norm_(grads, clip)
    else:
        total = torch.nn.utils.get_total_norm([p.grad for p in grads])
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)
