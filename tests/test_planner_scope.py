"""plan() patches process-wide state only inside its own scope: nn.Module.to, transformers' is_tracing, the default
dtype and the global RNG are what they were afterwards, also when plan() raises half-way."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import masking_utils

import velora.memory.planner as planner
from velora.memory import plan


def _process_state() -> tuple:
    return nn.Module.to, masking_utils.is_tracing, torch.get_default_dtype(), torch.get_rng_state()


def _assert_unchanged(before: tuple) -> None:
    module_to, is_tracing, default_dtype, rng = _process_state()
    assert module_to is before[0]
    assert is_tracing is before[1]
    assert default_dtype is before[2]
    assert torch.equal(rng, before[3])  # plan() seeds its own model build, not the caller's generator


def test_plan_leaves_process_state_as_it_was():
    torch.manual_seed(123)
    before = _process_state()
    planned = plan("llama-tiny", "velora", batch=1, seq=16, dtype="bf16")
    assert planned["peak_bytes"] > 0
    _assert_unchanged(before)


def test_plan_restores_process_state_when_it_raises_while_measuring(monkeypatch):
    torch.manual_seed(7)
    before = _process_state()
    seen = {}

    def failing_measure(*args, **kwargs):
        # inside the patched region: the patches are active here, and must be undone on the way out
        seen["to_patched"] = nn.Module.to is not before[0]
        seen["tracing_patched"] = masking_utils.is_tracing is not before[1]
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(planner, "measure_step_peak", failing_measure)
    with pytest.raises(RuntimeError, match="measurement failed"):
        plan("llama-tiny", "full", batch=1, seq=16, dtype="bf16")
    assert seen == {"to_patched": False, "tracing_patched": True}
    _assert_unchanged(before)


def test_plan_restores_process_state_when_the_model_build_raises():
    torch.manual_seed(9)
    before = _process_state()
    with pytest.raises(ValueError):  # peft refuses target modules the model does not have
        plan("llama-tiny", "lora", batch=1, seq=16, dtype="bf16", lora_targets=["no_such_module"])
    _assert_unchanged(before)
