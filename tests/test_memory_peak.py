"""measure_step_peak: exact categories on a hand-countable step, real vs FakeTensorMode, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from velora.memory import CATEGORIES, StorageTracker, measure_step_peak

FP32 = 4




def _linear_sgd_step(batch: int, d_in: int, d_out: int):
    """One Linear (no bias), loss = sum of outputs, plain SGD: every byte can be counted by hand."""
    torch.manual_seed(0)
    model = nn.Linear(d_in, d_out, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(batch, d_in)

    def step():
        loss = model(x).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step, x


def test_hand_counted_linear_step():
    batch, d_in, d_out = 8, 32, 16
    model, optimizer, step, x = _linear_sgd_step(batch, d_in, d_out)
    report = measure_step_peak(model, optimizer, step)
    weight = FP32 * d_in * d_out
    # Forward: the output (B, O) dies as soon as .sum() has run (sum keeps only a size), x is saved for
    # the weight gradient. Backward: the seed gradient of the loss is one element, expanded (a view);
    # the weight gradient (O, D) is stolen by .grad. Peak: weight + its gradient + saved x + the loss
    # and its seed gradient (two fp32 scalars); SGD without momentum updates in place.
    assert report.breakdown["parameters"] == weight
    assert report.breakdown["optimizer_state"] == 0
    assert report.breakdown["gradients"] == weight
    assert report.breakdown["activations"] == FP32 * batch * d_in
    assert report.breakdown["temporaries"] == 2 * FP32
    assert report.peak_bytes == sum(report.breakdown.values())
    assert report.cuda_max_memory_allocated is None  # CPU run
    assert set(report.breakdown) == set(CATEGORIES)


def test_adamw_state_is_counted_after_the_warm_up_step():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(5, 16)

    def step():
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    report = measure_step_peak(model, optimizer, step, steps=2)
    param_bytes = sum(p.numel() * FP32 for p in model.parameters())
    # exp_avg + exp_avg_sq per parameter, plus one fp32 step counter per parameter tensor
    assert report.breakdown["optimizer_state"] == 2 * param_bytes + FP32 * len(list(model.parameters()))
    assert report.breakdown["parameters"] == param_bytes
    assert report.peak_bytes == sum(report.breakdown.values())


def test_fake_tensor_mode_gives_the_same_step_peak_as_real_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.LayerNorm(48), nn.Linear(48, 24))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(6, 24)

        def step():
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return model, optimizer, step

    real = measure_step_peak(*build())
    with FakeTensorMode():
        fake = measure_step_peak(*build(), fake_scalars=True)
    assert fake.peak_bytes == real.peak_bytes
    assert fake.breakdown == real.breakdown


def test_storage_tracker_dedups_views_and_releases_dead_storages():
    with StorageTracker() as tracker:
        a = torch.empty(100)  # 400 bytes
        view = a.view(10, 10).t()
        assert tracker.live_bytes == 400
        b = torch.ones(50)
        assert tracker.live_bytes == 600
        del a
        assert tracker.live_bytes == 600  # the view keeps the storage
        del view
        assert tracker.live_bytes == 200
        del b
    assert tracker.peak_bytes == 600
    tracker.close()


def test_bad_arguments_are_one_line_errors():
    model, optimizer, step, _ = _linear_sgd_step(2, 4, 4)
    with pytest.raises(ValueError, match="steps=0"):
        measure_step_peak(model, optimizer, step, steps=0)
    with pytest.raises(ValueError, match="not callable"):
        measure_step_peak(model, optimizer, None)
