"""``Checkpointer`` on its own: step folders, the ``latest`` pointer, ``keep_last``, and a bitwise restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from velora.training.checkpoint import Checkpointer, latest_checkpoint
from velora.training.guards import TrainingDiverged


def _model_and_optimizer(seed: int, lr: float = 1e-2) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return model, optimizer


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    inputs = torch.randn(5, 8)  # (B, 8)
    model(inputs).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_keep_last_and_latest_pointer(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    assert checkpointer.latest() is None
    for step in (1, 2, 3):
        _step(model, optimizer)
        written = checkpointer.save(step, model, optimizer)
        assert written.name == f"step-{step:07d}"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000002", "step-0000003"]  # no temporary left, the oldest dropped
    assert checkpointer.latest() == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-0000003"


def test_restore_is_bitwise_and_keeps_this_runs_initial_lr(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    _step(model, optimizer)
    _step(model, optimizer)
    Checkpointer(tmp_path).save(2, model, optimizer)
    rng_at_save = torch.get_rng_state()
    _step(model, optimizer)  # the straight run continues from the saved point
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # the RNG comes back from the checkpoint
    resumed, resumed_optimizer = _model_and_optimizer(7, lr=5e-3)  # other weights, another --lr
    step = Checkpointer(tmp_path).restore(latest_checkpoint(tmp_path), resumed, resumed_optimizer)
    assert step == 2 and torch.equal(torch.get_rng_state(), rng_at_save)
    assert [g["initial_lr"] for g in resumed_optimizer.param_groups] == [5e-3]  # this run's, not the saved 1e-2
    for group in resumed_optimizer.param_groups:
        group["lr"] = 1e-2  # what the schedule of the straight run used
    _step(resumed, resumed_optimizer)
    assert all(torch.equal(resumed.state_dict()[k], expected[k]) for k in expected)


def test_refuses_to_checkpoint_non_finite_weights(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"refusing to checkpoint step 4: 0\.weight holds NaN/Inf"):
        Checkpointer(tmp_path).save(4, model, optimizer)
    assert latest_checkpoint(tmp_path) is None
