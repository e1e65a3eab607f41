"""--device: every parameter, batch and optimizer/accumulator state tensor lives on the configured device; bad
devices are one-line errors. The cuda-marked tests run on a GPU machine (benchmarks/gpu_check.py) and skip here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from velora.training.device import resolve_device
from velora.training.loop import TrainConfig, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(text_file: Path, **changes) -> TrainConfig:
    settings = dict(model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32, batch_size=4, steps=3,
                    lr=3e-3, warmup_steps=1, eval_batches=2, velora={"sub_token_size": 16, "target_modules": "paper"})
    settings.update(changes)
    return TrainConfig(**settings)


class DeviceProbe:
    """Records the device of every batch the model sees and of every optimizer state tensor after each step."""

    def __init__(self) -> None:
        self.batch_devices: set[torch.device] = set()
        self.state_devices: set[torch.device] = set()
        self.param_devices: set[torch.device] = set()
        self.steps = 0
        self._handle = register_optimizer_step_post_hook(self._after_step)

    def attach(self, model) -> None:
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module, args, kwargs) -> None:
        self.batch_devices.add(kwargs["input_ids"].device)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        for group in optimizer.param_groups:
            self.param_devices.update(p.device for p in group["params"])
        for state in optimizer.state.values():
            self.state_devices.update(v.device for v in state.values() if isinstance(v, torch.Tensor) and v.dim())

    def close(self) -> None:
        self._handle.remove()


def _run_on(text_file: Path, device: str, method: str, **changes) -> tuple[dict, DeviceProbe]:
    probe = DeviceProbe()
    try:
        result = train(tiny(text_file, method=method, **changes), measure=False, on_model_ready=probe.attach,
                       device=device)
    finally:
        probe.close()
    return result, probe


def _assert_all_on(result: dict, probe: DeviceProbe, device: torch.device) -> None:
    model = result["_model"]
    assert probe.steps >= 1
    assert {p.device for p in model.parameters()} == {device}
    assert {b.device for b in model.buffers()} <= {device}
    assert probe.batch_devices == {device}
    assert probe.param_devices == {device} and probe.state_devices == {device}
    assert result["device"] == str(device)


@pytest.mark.parametrize("method, changes", [
    ("lora+velora", {}),
    ("full", {"accumulation_steps": 2, "options": {"flora_accumulation": True, "flora_rank": 4}}),
])
def test_device_cpu_puts_model_batches_and_optimizer_state_on_the_cpu(text_file, method, changes):
    result, probe = _run_on(text_file, "cpu", method, **changes)
    _assert_all_on(result, probe, torch.device("cpu"))


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu0", "", "cpu:zero"])
def test_bad_device_string_is_a_one_line_error(spec):
    with pytest.raises(ValueError) as err:
        resolve_device(spec)
    assert repr(spec) in str(err.value) and "\n" not in str(err.value)


def test_device_must_be_a_string_or_torch_device():
    with pytest.raises(TypeError, match="must be a string"):
        resolve_device(0)


def test_auto_picks_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error_through_the_cli(tmp_path, capsys, text_file):
    from velora.cli import main

    code = main(["train", "--device", "cuda", "--data", str(text_file), "--tokenizer", "byte", "--steps", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "sees no CUDA device" in err and "--device cpu" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_torchrun_rank_refuses_a_fixed_cuda_index(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            resolve_device("cuda:0")
        return
    with pytest.raises(ValueError, match="every rank on one GPU"):
        resolve_device("cuda:0")


# ---- on a GPU (skipped on CPU machines; benchmarks/gpu_check.py runs them) -------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", ["full", "lora+velora", "qlora+velora", "galore"])
def test_device_cuda_trains_with_everything_on_the_gpu(text_file, method):
    result, probe = _run_on(text_file, "cuda", method, steps=8, lr=1e-2 if "lora" in method else 3e-3)
    _assert_all_on(result, probe, resolve_device("cuda"))
    losses = [loss for _, loss in result["loss_curve"]]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses  # byte-level loss starts near ln(257)


@pytest.mark.cuda
@needs_cuda
def test_device_cuda_flora_accumulation_state_on_the_gpu(text_file):
    changes = {"accumulation_steps": 2, "options": {"flora_accumulation": True, "flora_rank": 4}}
    result, probe = _run_on(text_file, "cuda", "full", **changes)
    _assert_all_on(result, probe, resolve_device("cuda"))


@pytest.mark.cuda
@needs_cuda
def test_device_cuda_memory_columns_come_from_cuda_max_memory_allocated(tmp_path, text_file, capsys):
    """The CLI's memory columns on CUDA: torch.cuda.max_memory_allocated of a copy's second step, at least the
    copy's parameters + gradients + AdamW state, and below the whole device's peak."""
    from velora.cli import main

    code = main(["train", "--device", "cuda", "--data", str(text_file), "--tokenizer", "byte", "--model",
                 "llama-tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--out",
                 str(tmp_path / "run"), "--json", "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"].startswith("cuda")
    assert "torch.cuda.max_memory_allocated" in result["memory_source"]
    weights = 4 * result["parameters"]  # fp32 bytes
    assert result["peak_bytes"] >= 4 * weights  # parameters + gradients + two AdamW moments
    assert result["peak_bytes"] <= torch.cuda.max_memory_allocated()
    assert 0 < result["activation_bytes"] < result["peak_bytes"]


@pytest.mark.cuda
@needs_cuda
def test_device_cuda_resume_is_bitwise(tmp_path, text_file):
    config = tiny(text_file, method="lora+velora", steps=4)
    straight = train(config, tmp_path / "straight", measure=False, device="cuda")
    train(config, tmp_path / "split", measure=False, stop_at_step=2, device="cuda")
    resumed = train(config, tmp_path / "split", resume=True, measure=False, device="cuda")
    a, b = straight["_model"].state_dict(), resumed["_model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["loss_curve"] == straight["loss_curve"]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("orthogonal", [False, True])
def test_projections_are_drawn_on_the_gpu_reproducibly(orthogonal):
    from velora.optim.projections import random_projection

    device = resolve_device("cuda")
    first = random_projection(7, 96, 8, device=device, orthogonal=orthogonal)  # (r, n)
    again = random_projection(7, 96, 8, device=device, orthogonal=orthogonal)
    assert first.device == device and torch.equal(first, again)
    assert not torch.equal(first, random_projection(8, 96, 8, device=device, orthogonal=orthogonal))
    if orthogonal:  # rows orthonormal up to the sqrt(n / r) scale
        gram = first @ first.T / (96 / 8)  # (r, r)
        assert torch.allclose(gram, torch.eye(8, device=device), atol=1e-5)
