"""How much of each wrapped layer's input and weight gradient survives VeLoRA's projection.

For every VeLoRA layer that compresses on a batch (full-weight layers and peft ``lora_A`` adapters alike):

- ``energy``: Σ‖Vᵀs‖² / Σ‖s‖² over all sub-tokens s of the layer's input: the share of the input energy on
  span(V), which is exactly what z = group(x)·V keeps (V has orthonormal columns). Isotropic input keeps r/M.
- ``cosine`` and ``norm_ratio`` between the VeLoRA weight gradient Gᵀx̂ and the exact one Gᵀx on that batch,
  in float64, where G is the layer's output gradient and x̂ is rebuilt from the z the op keeps (rounded to
  ``coefficient_bits`` when the config asks for it, so the cosine includes that rounding; ``energy`` does not).
- ``column_error``: the median over input features j of ‖Ĝ_j − G_j‖ / ‖G_j‖, the relative error of the weight
  gradient's column j (what input feature j feeds). The cosine is dominated by the largest columns, so a few
  large features can keep it near 1 while every other column is off; this shows it (0 when x̂ = x).

The measurement is off the training path: the wrapped layers run as their plain class for one forward, their
inputs and outputs are captured by hooks, and ``torch.autograd.grad`` gives G without touching any ``.grad``.
v, its EMA state, every buffer, every module's train/eval mode and the global RNG state are restored.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velora.core.layers import velora_modules
from velora.core.subtoken import compress, dequantise_coefficients, quantise_coefficients, reconstruct


@dataclass
class LayerFidelity:
    """One wrapped layer on one batch. NaN where undefined (all-zero input or zero output gradient)."""

    name: str
    in_features: int
    sub_token_size: int
    rank: int
    tokens: int
    energy: float  # Σ‖Vᵀs‖² / Σ‖s‖²
    chance_energy: float  # r/M: what a direction independent of isotropic input keeps
    cosine: float  # cos(Gᵀx̂, Gᵀx)
    norm_ratio: float  # ‖Gᵀx̂‖ / ‖Gᵀx‖
    column_error: float  # median over input features j of ‖(Gᵀx̂ − Gᵀx)_j‖ / ‖(Gᵀx)_j‖
    z_bytes: int  # what the layer saves for backward (z in x's dtype, or its integer codes and scales)
    x_bytes: int  # what the plain layer would save (x)


@dataclass
class FidelityReport:
    layers: list[LayerFidelity]
    skipped: list[str] = field(default_factory=list)  # wrapped layers that compressed nothing on this batch

    def median(self, column: str) -> float:
        values = [getattr(row, column) for row in self.layers if not math.isnan(getattr(row, column))]
        return statistics.median(values) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: NaN becomes None."""
        rows = [{k: _json_number(v) for k, v in asdict(row).items()} for row in self.layers]
        summary = {f"median_{c}": _json_number(self.median(c))
                   for c in ("energy", "cosine", "norm_ratio", "column_error")}
        return {"layers": rows, "skipped": list(self.skipped), **summary}

    def to_markdown(self) -> str:
        lines = ["| layer | D | M | r | energy | r/M | grad cosine | norm ratio | column error | z / x bytes |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in self.layers:
            lines.append(f"| `{row.name}` | {row.in_features} | {row.sub_token_size} | {row.rank} | {row.energy:.4f} "
                         f"| {row.chance_energy:.4f} | {row.cosine:.4f} | {row.norm_ratio:.4f} "
                         f"| {row.column_error:.4f} | {row.z_bytes / row.x_bytes:.4f} |")
        lines.append(f"\nmedian gradient cosine {self.median('cosine'):.4f}, median energy "
                     f"{self.median('energy'):.4f}, median column error {self.median('column_error'):.4f} over "
                     f"{len(self.layers)} layer(s)")
        if any(math.isnan(row.cosine) for row in self.layers):
            lines.append("nan: the exact weight gradient is zero on this batch (e.g. a LoRA A while its B is still "
                         "zero: train a few steps first)")
        if self.skipped:
            lines.append(f"not compressing on this batch (frozen or not called): {', '.join(self.skipped)}")
        return "\n".join(lines)


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


# ---- capture ------------------------------------------------------------------------------------------


@contextmanager
def _untouched(model: nn.Module):
    """Run with the model in train mode, and put back every module's mode, every buffer and the RNG state."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(module, key, tensor, tensor.detach().clone()) for module in model.modules()
               for key, tensor in module._buffers.items() if tensor is not None]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.train()
        yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for module, key, tensor, copy in buffers:
                module._buffers[key] = tensor
                if not torch.equal(tensor, copy):  # a train-mode forward moved it in place (e.g. BatchNorm)
                    tensor.copy_(copy)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@contextmanager
def _plain_layers(layers: dict[str, nn.Module], calls: dict[str, list]):
    """Swap each wrapped layer to its plain class (no v init, no EMA step, no compression) and record
    (input, output) of every call on which VeLoRA would have compressed."""
    handles, wrappers = [], {}
    capturing = [True]  # off during backward: checkpointed regions re-run their forward there

    def make_hook(name: str, wrapper: type):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()), None)  # layer(x) or layer(input=x)
            if not capturing[0] or not isinstance(x, torch.Tensor) or not output.requires_grad:
                return
            if wrapper._velora_active(module, x):  # the rule the wrapped forward applies (DoRA probes, frozen)
                calls[name].append((x.detach(), output))
        return hook

    try:
        for name, layer in layers.items():
            wrappers[name] = type(layer)
            handles.append(layer.register_forward_hook(make_hook(name, type(layer)), with_kwargs=True))
            layer.__class__ = layer._velora_base_class
        yield capturing
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in layers.items():
            layer.__class__ = wrappers[name]


def _loss(model: nn.Module, batch: Any, loss_fn) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    elif isinstance(batch, dict):
        loss = model(**batch)
    elif isinstance(batch, torch.Tensor) and hasattr(model, "config"):
        loss = model(input_ids=batch, labels=batch)  # a causal LM, as `velora train` calls it
    else:
        raise TypeError(f"diagnose: cannot build a loss from a {type(batch).__name__} batch for a "
                        f"{type(model).__name__}; pass loss_fn(model, batch) -> scalar loss")
    loss = getattr(loss, "loss", loss)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("diagnose: the loss must be a scalar tensor that depends on the trainable weights; "
                         "pass loss_fn(model, batch) -> scalar loss")
    return loss.reshape(())


# ---- statistics ---------------------------------------------------------------------------------------


def _layer_fidelity(name: str, layer: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]],
                    grads: list[torch.Tensor | None]) -> LayerFidelity:
    directions = layer.velora_v  # (M, r) or (G, M, r), as the op uses it
    size, rank = directions.shape[-2:]
    in_features = layer._velora_in_features()
    kept_as = layer.velora_config.coefficient_format()
    exact = approx = None
    kept = total = 0.0
    tokens = z_bytes = x_bytes = 0
    for (x, output), grad in zip(calls, grads):
        inputs = x.reshape(-1, in_features)  # (T, D)
        out_grad = (torch.zeros_like(output) if grad is None else grad).reshape(-1, output.shape[-1]).double()  # (T, O)
        z = compress(inputs, directions)  # (T, G, r) in x's dtype: what the op saves, before any rounding to bits
        if kept_as is not None:
            stored = quantise_coefficients(z, *kept_as)  # what the op keeps under coefficient_bits
            z = dequantise_coefficients(stored, kept_as.bits, z.shape, z.dtype)  # (T, G, r), rounded
            z_bytes += sum(t.numel() * t.element_size() for t in stored if t is not None)
        else:
            z_bytes += z.numel() * z.element_size()
        x_hat = reconstruct(z.double(), directions.double(), in_features, layer.velora_config.scale)  # (T, D)
        exact_part = out_grad.t() @ inputs.double()  # (O, D); Conv1D's (D, O) weight gets its transpose
        approx_part = out_grad.t() @ x_hat  # (O, D)
        exact = exact_part if exact is None else exact + exact_part
        approx = approx_part if approx is None else approx + approx_part
        kept += float(compress(inputs.double(), directions.double()).pow(2).sum())  # Σ‖Vᵀs‖², fp64
        total += float(inputs.double().pow(2).sum())  # Σ‖s‖² (zero padding adds nothing)
        tokens += inputs.shape[0]
        x_bytes += inputs.numel() * inputs.element_size()
    exact_norm, approx_norm = float(exact.norm()), float(approx.norm())
    cosine = float((exact * approx).sum()) / (exact_norm * approx_norm) if exact_norm and approx_norm else math.nan
    return LayerFidelity(
        name=name, in_features=in_features, sub_token_size=size, rank=rank, tokens=tokens,
        energy=kept / total if total else math.nan, chance_energy=rank / size, cosine=cosine,
        norm_ratio=approx_norm / exact_norm if exact_norm else math.nan,
        column_error=_median_column_error(exact, approx), z_bytes=z_bytes, x_bytes=x_bytes)


def _median_column_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """Median over the columns j with ‖exact_j‖ > 0 of ‖approx_j − exact_j‖ / ‖exact_j‖ (both (O, D), fp64)."""
    norms = exact.norm(dim=0)  # (D,)
    nonzero = norms > 0  # (D,)
    if not bool(nonzero.any()):
        return math.nan
    errors = (approx - exact).norm(dim=0)[nonzero] / norms[nonzero]  # (D',)
    return float(statistics.median(errors.tolist()))


def diagnose(model: nn.Module, batch: Any, loss_fn=None) -> FidelityReport:
    """Gradient fidelity of every VeLoRA layer of ``model`` on ``batch`` (see the module docstring).

    ``batch``: input ids (B, T) for a causal LM (labels = inputs, as ``velora train``), a dict of model
    keyword arguments, or anything ``loss_fn(model, batch) -> scalar loss`` accepts (a DDP wrapper is unwrapped:
    this rank's module alone runs, with no collective). Uses each layer's current
    v (under ``init="ema"`` a training forward would first move it one step with this batch). The model is
    left exactly as it was: parameters, buffers, modes, no ``.grad`` written, RNG state restored.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # DDP's forward would arm its reducer for a backward that never reaches it
    layers = velora_modules(model)
    if not layers:
        raise ValueError("diagnose: the model has no VeLoRA layers; call velora.apply_velora(model, config) first")
    waiting = [name for name, layer in layers.items() if not layer._velora_ready]
    if waiting:
        raise ValueError(f"diagnose: {len(waiting)} VeLoRA layer(s), e.g. {waiting[0]!r}, have no v yet; run one "
                         "training forward first so v is built from a batch other than the diagnosed one")
    calls: dict[str, list] = {name: [] for name in layers}
    with _untouched(model), _plain_layers(layers, calls) as capturing, torch.enable_grad():
        loss = _loss(model, batch, loss_fn)
        capturing[0] = False
        outputs = [output for name in layers for _x, output in calls[name]]
        if not outputs:
            raise ValueError("diagnose: no VeLoRA layer compressed on this batch (every wrapped weight frozen, or "
                             "none called); unfreeze the wrapped layers or check the batch reaches them")
        grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True))
    rows, skipped = [], []
    for name, layer in layers.items():
        layer_grads = [next(grads) for _ in calls[name]]
        if calls[name]:
            rows.append(_layer_fidelity(name, layer, calls[name], layer_grads))
        else:
            skipped.append(name)
    return FidelityReport(rows, skipped)


# ---- logging during training ---------------------------------------------------------------------------

LOG_COLUMNS = ("step", "layer", "energy", "cosine", "norm_ratio", "column_error")


class DiagnosisLog:
    """``diagnose.csv`` in the run folder (one row per layer per diagnosed step) and TensorBoard scalars.

    On resume, rows past the resumed step are dropped, as ``log.csv`` does."""

    def __init__(self, out_dir: Path, every: int, resume_step: int = 0, scalar=None) -> None:
        self.path = Path(out_dir) / "diagnose.csv"
        self.every = every
        rows = []
        if resume_step > 0 and self.path.is_file() and not self.path.is_symlink():
            with open(self.path) as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        # a fresh file renamed into place: a symlink planted at the path is replaced, never written through
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self._scalar = scalar

    def after_backward(self, step: int, model: nn.Module, batch: torch.Tensor) -> None:
        """Diagnose the step's last micro-batch with the weights and v that step used, when it is due."""
        if step % self.every == 0:
            self.write(step, diagnose(model, batch))

    def write(self, step: int, report: FidelityReport) -> None:
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(descriptor, "a", newline="") as fh:
            writer = csv.DictWriter(fh, LOG_COLUMNS)
            for row in report.layers:
                writer.writerow({"step": step, "layer": row.name, "energy": row.energy, "cosine": row.cosine,
                                 "norm_ratio": row.norm_ratio, "column_error": row.column_error})
        if self._scalar is not None:
            for row in report.layers:
                self._scalar(f"fidelity/cosine/{row.name}", row.cosine, step)
                self._scalar(f"fidelity/energy/{row.name}", row.energy, step)
                self._scalar(f"fidelity/column_error/{row.name}", row.column_error, step)


def open_diagnosis_log(out_dir: Path | None, every: int, method: str, resume_step: int, run_log,
                       main_process: bool = True) -> DiagnosisLog | None:
    """The log ``velora train --diagnose-every N`` writes (None when off, or on a rank other than 0)."""
    from velora.methods.registry import parse_method

    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"diagnose_every={every!r} must be an integer >= 0 (0: off)")
    if not every:
        return None
    if not parse_method(method).velora:
        raise ValueError(f"--diagnose-every: method {method!r} has no VeLoRA layers; use a +velora method")
    if out_dir is None:
        raise ValueError("--diagnose-every writes diagnose.csv into the run folder; pass --out DIR")
    if not main_process:
        return None
    return DiagnosisLog(out_dir, every, resume_step, getattr(run_log, "scalar", None))


__all__ = ["DiagnosisLog", "FidelityReport", "LayerFidelity", "diagnose", "open_diagnosis_log"]
