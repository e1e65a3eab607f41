"""`plan()`: peak training memory of a model/method/optimizer/batch, predicted on fake tensors.

The planner builds the very training step the library runs (same registry surgery, same optimizer,
same loss) and measures it with the whole-step peak tracker, but under ``FakeTensorMode``: every
tensor has a real shape, dtype and storage size and no data, so a LLaMA-7B step costs seconds and no
memory. ``training_setup`` is the shared half: the validation runs it on real tensors and compares.

Assumptions (stated in the output): pure ``dtype`` weights (no mixed-precision master copy); the
step is ``loss = model(**batch).loss; loss.backward(); optimizer.step(); zero_grad(set_to_none=True)``;
language models get ``input_ids`` = ``labels`` of shape (batch, seq); ViT gets images whose patch
count + 1 equals seq; peak = the second step, as ``max_memory_allocated`` would report it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from velora.memory.peak import CATEGORIES, StorageTracker, measure_step_peak

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainingSetup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    method: str
    notes: list[str]


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; choose one of {list(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose one of {list(DTYPES)}")
    return DTYPES[dtype]


def load_config(model: Any, **overrides: Any):
    """A transformers config from a preset name, a config.json path/directory, or a config object."""
    from velora.training.models import build_config

    if isinstance(model, str):
        return build_config(model, **overrides)
    if hasattr(model, "model_type") and hasattr(model, "to_dict"):
        if overrides:
            model = type(model).from_dict({**model.to_dict(), **overrides})
        return model
    raise ValueError(f"model={model!r} must be a preset name, a path to a config.json, or a transformers config")


@contextlib.contextmanager
def _module_to_replaces_parameters():
    """``Module.to`` swaps parameters in place (``torch.utils.swap_tensors``), which fake parameters refuse
    (FakeTensorMode keeps weak references to them). While the model is being built and adapted (before
    any optimizer holds its parameters) a conversion may as well put new Parameters in place."""
    original = nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args, **kwargs)
        converted: dict[int, torch.Tensor] = {}  # keeps tied weights tied

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in converted:
                target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                new = tensor.to(device=device or tensor.device, dtype=target)
                if new is not tensor and isinstance(tensor, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                converted[id(tensor)] = new
            return converted[id(tensor)]

        for module in self.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is not None:
                        store[name] = convert(tensor)
        return self

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


@contextlib.contextmanager
def _masks_as_on_real_tensors():
    """transformers treats fake tensors like a compiler trace and then builds a dense (B, 1, S, S) causal
    mask that a real run skips (SDPA's is_causal). Let it take the real run's branch; the one value it
    reads (no padding) is answered by the tracker's fake-scalar rule."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "is_tracing", None)
    if original is None:
        yield
        return
    masking_utils.is_tracing = lambda tensor=None: original(None)
    try:
        yield
    finally:
        masking_utils.is_tracing = original


def _preset_velora_directions(model: nn.Module) -> int:
    """Give every VeLoRA layer its directions before the first step. Their data-dependent initialisation
    (mean sub-token, finiteness checks) cannot run on fake tensors and costs nothing in the measured
    second step; the directions' values do not change any byte count."""
    from velora.core.layers import velora_modules

    modules = velora_modules(model)
    for module in modules.values():
        if not module.velora_ready:
            shape = module.velora_v.shape  # (M, r), or (G, M, r) with per-group directions
            module.set_velora_directions(torch.eye(*shape[-2:]).expand(shape))  # orthonormal columns
    return len(modules)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # build parameters directly in the target dtype: Module.to(dtype) cannot swap fake parameters
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def make_batch(config, batch: int, seq: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs + labels for one step of the model ``build_model(config)`` returns."""
    from velora.training.models import model_family

    family = model_family(config)
    if family == "vit":
        channels = getattr(config, "num_channels", 3)
        pixel_values = torch.randn(batch, channels, config.image_size, config.image_size, dtype=dtype)
        labels = torch.randint(0, config.num_labels, (batch,))  # (B,)
        return {"pixel_values": pixel_values, "labels": labels}
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))  # (B, S)
    return {"input_ids": input_ids, "labels": input_ids}


def _check_shapes(config, batch: int, seq: int) -> Any:
    """Validate batch/seq against the config; for ViT, return the config sized to ``seq`` tokens."""
    from velora.training.models import model_family

    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    family = model_family(config)
    if family == "vit":
        patches = seq - 1  # + the class token
        side = round(patches ** 0.5)
        if side * side != patches:
            default = (config.image_size // config.patch_size) ** 2 + 1
            raise ValueError(f"seq={seq} is not a ViT token count (patches² + 1); use --seq {default} for "
                             f"image_size={config.image_size}, patch_size={config.patch_size}")
        config = copy.deepcopy(config)  # the caller's config stays as it was
        config.image_size = side * config.patch_size
        return config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    offset = 2 if family in ("roberta",) else 0  # RoBERTa positions start after the padding index
    if family in ("gpt2", "roberta", "bert") and limit is not None and seq + offset > limit:
        raise ValueError(f"seq={seq} exceeds the {limit - offset} positions of this {family} config; "
                         f"lower --seq or raise max_position_embeddings in the config")
    return config


def _method_options(optimizer: str, options: dict[str, Any]):
    """``MethodOptions`` from plan()'s flat ``options`` (velora.methods.options.OPTION_KEYS) plus
    ``velora_<VeLoRAConfig field>`` / ``sub_token_size`` for the VeLoRA config."""
    from velora.core.config import VeLoRAConfig
    from velora.methods.options import MethodOptions, default_velora, known_keys

    options = dict(options)
    velora_keys = {f.name for f in dataclasses.fields(VeLoRAConfig)} - {"version"}
    velora_changes = {key[len("velora_"):]: options.pop(key) for key in list(options)
                      if key.startswith("velora_") and key[len("velora_"):] in velora_keys}
    if "sub_token_size" in options:
        velora_changes["sub_token_size"] = options.pop("sub_token_size")
    unknown = sorted(set(options) - set(known_keys()))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; plan() takes {known_keys()} or velora_<VeLoRAConfig field> "
                         "/ sub_token_size")
    method_options = MethodOptions.from_flat({**options, "optimizer": optimizer})
    if velora_changes:
        velora = {**default_velora().to_dict(), **velora_changes}
        velora.pop("version", None)
        method_options.velora = VeLoRAConfig(**velora)
    return method_options


def training_setup(config, method: str, optimizer: str = "adamw", *, batch: int, seq: int,
                   dtype: str | torch.dtype = "fp32", seed: int = 0, **options: Any) -> TrainingSetup:
    """Model (after the method's surgery), optimizer and a one-step closure, on whatever tensors the
    current mode makes (real, or fake under ``FakeTensorMode``)."""
    from velora.methods.registry import Method, build_optimizer, check_optimizer, parse_method, prepare_model
    from velora.training.models import build_model

    torch_dtype = parse_dtype(dtype)
    parsed = parse_method(method)
    method_options = _method_options(optimizer, options)
    check_optimizer(parsed, method_options.optim.name)
    config = _check_shapes(config, batch, seq)
    notes: list[str] = []
    torch.manual_seed(seed)
    with _default_dtype(torch_dtype):
        model = build_model(config)
        if parsed.base == "qlora":
            from velora.memory.nf4 import quantize_lora_base_layers

            # QLoRA = LoRA adapters on NF4-quantised frozen linears; the LoRA path of the registry does the surgery
            model = prepare_model(model, Method("lora", parsed.velora, parsed.checkpointing), method_options)
            count = quantize_lora_base_layers(model)
            notes.append(f"qlora: {count} base linears emulated as NF4 (0.516 byte/weight incl. double-quantised "
                         "absmax), dequantised to a temporary in forward and backward")
            opt = build_optimizer(model, Method("lora"), method_options)
        else:
            model = prepare_model(model, parsed, method_options)
            opt = build_optimizer(model, parsed, method_options)
    model.train()
    inputs = make_batch(config, batch, seq, torch_dtype)

    def step() -> None:
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return TrainingSetup(model=model, optimizer=opt, step=step, method=parsed.name, notes=notes)


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all weights, trainable weights); an NF4-emulated layer counts its O·D weights."""
    from velora.memory.nf4 import NF4Linear

    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return total, trainable


@contextlib.contextmanager
def _fake_scalars():
    """Answer ``.item()`` of data-dependent fake tensors (e.g. ``trunc_normal_`` init, SVD checks) the way
    the peak tracker does; nothing is measured."""
    scalars = StorageTracker(fake_scalars=True)
    try:
        with scalars:
            yield
    finally:
        scalars.close()


def _warm_up_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The first training step's only lasting effect is the optimizer state, whose shapes do not depend
    on the gradients' values: step once on zero gradients instead of paying a forward and backward."""
    with _fake_scalars():
        for param in model.parameters():
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _measure(setup: TrainingSetup, full_warmup: bool):
    if full_warmup:
        return measure_step_peak(setup.model, setup.optimizer, setup.step, steps=2, fake_scalars=True)
    _warm_up_optimizer(setup.model, setup.optimizer)
    return measure_step_peak(setup.model, setup.optimizer, setup.step, steps=1, fake_scalars=True)


def plan(model: Any, method: str = "full", optimizer: str = "adamw", batch: int = 1, seq: int = 512,
         dtype: str = "fp32", *, full_warmup: bool = False, **options: Any) -> dict[str, Any]:
    """Predicted peak memory (bytes) of training ``model`` with ``method``; no real allocation.

    ``model``: preset name, config.json path or transformers config. ``options``: flat method options
    (velora.methods.options.OPTION_KEYS: ``lora_rank``, ``galore_rank``, ``lora_targets`` ...) and
    ``sub_token_size`` / ``velora_<VeLoRAConfig field>``. Returns ``peak_bytes`` and ``breakdown``
    (parameters, gradients, optimizer_state, activations, temporaries at the peak moment) plus what was planned.

    The peak is that of the second training step. By default the first step is replaced by one optimizer
    step on zero gradients (same optimizer state, half the tracing time); ``full_warmup=True`` traces a
    real first step instead.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.perf_counter()
    model_name = model if isinstance(model, str) else getattr(model, "name_or_path", None) or model.model_type
    config = load_config(model)
    parse_dtype(dtype)
    if not isinstance(full_warmup, bool):
        raise ValueError(f"full_warmup={full_warmup!r} must be True or False")
    # every process-wide change below is undone on the way out, also on an error: the RNG (training_setup seeds the
    # build), Module.to, transformers' is_tracing and the default dtype (each patched in its own context manager)
    with torch.random.fork_rng(devices=[]), FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation chatter from peft
        with _module_to_replaces_parameters(), _fake_scalars():
            setup = training_setup(config, method, optimizer, batch=batch, seq=seq, dtype=dtype, **options)
        _preset_velora_directions(setup.model)
        with _masks_as_on_real_tensors():
            report = _measure(setup, full_warmup)
    total, trainable = _count_parameters(setup.model)
    breakdown = {name: int(report.breakdown.get(name, 0)) for name in CATEGORIES}
    return {
        "model": model_name,
        "method": setup.method,
        "optimizer": optimizer,
        "batch": batch,
        "seq": seq,
        "dtype": dtype if isinstance(dtype, str) else str(dtype),
        "peak_bytes": int(report.peak_bytes),
        "breakdown": breakdown,
        "saved_activation_bytes": int(report.saved_activations_max),
        "parameter_count": total,
        "trainable_parameter_count": trainable,
        "notes": setup.notes,
        "seconds": round(time.perf_counter() - started, 3),
    }
