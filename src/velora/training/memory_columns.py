"""The memory columns of a run's result: saved-activation bytes of one training forward and the peak of one
training step, measured on a deep copy of the trained model (the run's own model, optimizer and RNG are untouched).
On CUDA the peak is ``torch.cuda.max_memory_allocated``; elsewhere ``velora.memory.measure_step_peak``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from velora.memory import SavedActivationMeter, measure_step_peak
from velora.methods.registry import MethodOptions, build_optimizer


def saved_activation_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Unique bytes the autograd graph of one training forward on ``batch`` (B, T) keeps (``SavedActivationMeter``);
    the loss stays alive until the meter closes, so the graph is counted whole."""
    with SavedActivationMeter(model) as meter:
        loss = model(input_ids=batch, labels=batch).loss
    del loss
    return int(meter.total_bytes)


def measure_memory(model: nn.Module, method: str, options: MethodOptions, batch: torch.Tensor) -> dict[str, Any]:
    """Saved-activation bytes of one training forward and the peak of a training step, measured on a deep
    copy (the run's own model, optimizer and RNG are untouched)."""
    rng = torch.get_rng_state()
    floor = torch.cuda.memory_allocated(batch.device) if batch.is_cuda else 0  # the run's own model and state
    model_copy = copy.deepcopy(model)
    model_copy.train()
    optimizer = build_optimizer(model_copy, method, options)

    def step_fn():
        loss = model_copy(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    report: dict[str, Any] = {"activation_bytes": saved_activation_bytes(model_copy, batch)}
    if batch.is_cuda:
        report.update(_cuda_step_peak(step_fn, batch.device, floor))
    else:
        peak = measure_step_peak(model_copy, optimizer, step_fn, steps=2)
        report.update({"peak_bytes": int(peak.peak_bytes),
                       "peak_breakdown": {k: int(v) for k, v in peak.breakdown.items()},
                       "memory_source": "velora.memory"})
    torch.set_rng_state(rng)
    return report


def _cuda_step_peak(step_fn, device: torch.device, floor: int) -> dict[str, Any]:
    """torch.cuda.max_memory_allocated over the second of two steps (the first creates the optimizer state),
    minus ``floor``, what was allocated before the copy was made (the run's own model and optimizer stay
    resident meanwhile): the copy's parameters, gradients, optimizer state, activations and temporaries."""
    step_fn()  # warm-up: optimizer state, VeLoRA directions, cuBLAS workspace
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step_fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - floor
    return {"peak_bytes": int(peak), "peak_breakdown": {"cuda_max_memory_allocated": int(peak)},
            "memory_source": "torch.cuda.max_memory_allocated (second step, minus what the run held before)"}
