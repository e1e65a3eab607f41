"""Issue 17's pre-training setting where every layer matters: the compressed layers at a fraction of the run's lr
(``velora.experiments.control.scale_compressed_lr``, train's ``on_optimizer_ready`` hook, the study's
``compressed_lr_scale``)."""

from __future__ import annotations

import importlib.util
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from velora.experiments.control import scale_compressed_lr
from velora.experiments.fidelity_study import PAPER, lr_scale_of, run_study
from velora.training.loop import TrainConfig, train

COMPRESSED = ("v_proj.weight", "down_proj.weight")


def _tiny(text_file, **changes) -> TrainConfig:
    settings = dict(method="velora", model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32,
                    batch_size=4, steps=3, lr=1e-2, warmup_steps=1, eval_batches=1,
                    velora={"sub_token_size": 16, "target_modules": "paper"})
    settings.update(changes)
    return TrainConfig(**settings)


def _train(config, folder, scale=None, **kwargs):
    hook = None if scale is None else partial(scale_compressed_lr, scale=scale)
    result = train(config, folder, measure=False, tensorboard=False, memory_check=False, on_optimizer_ready=hook,
                   **kwargs)
    return {name: p.detach().clone() for name, p in result["_model"].named_parameters()}


def _initial(text_file, tmp_path):
    seen = {}
    train(_tiny(text_file, steps=1), tmp_path / "init", measure=False, tensorboard=False, memory_check=False,
          stop_at_step=0, on_model_ready=lambda m: seen.update({n: p.detach().clone()
                                                                 for n, p in m.named_parameters()}))
    return seen


def test_the_schedule_keeps_the_ratio_and_the_first_update_scales_with_it(tmp_path, text_file):
    captured, lrs = {}, []

    def ready(model, optimizer):
        captured["names"] = scale_compressed_lr(model, optimizer, 0.25)
        captured["optimizer"] = optimizer

    def on_step(row):
        groups = captured["optimizer"].param_groups
        lrs.append([group["lr"] for group in groups])

    train(_tiny(text_file, steps=4), tmp_path / "run", measure=False, tensorboard=False, memory_check=False,
          on_optimizer_ready=ready, on_step=on_step)
    assert sorted(captured["names"]) == sorted(f"model.layers.{i}.{name}" for i in (0, 1)
                                               for name in ("self_attn.v_proj.weight", "mlp.down_proj.weight"))
    assert len(lrs) == 4 and all(len(step) == 2 for step in lrs)
    for others, compressed in lrs:  # warmup then cosine: the compressed group follows at a quarter
        assert compressed == pytest.approx(0.25 * others, rel=1e-12) and others > 0

    # Adam's first update is lr times a function of the gradient alone, and the first gradient does not depend on
    # the lr: the compressed weights move by exactly the scale times what they move at the run's lr
    before = _initial(text_file, tmp_path)
    full = _train(_tiny(text_file, steps=1), tmp_path / "one", None)
    scaled = _train(_tiny(text_file, steps=1), tmp_path / "quarter", 0.25)
    for name in before:
        if name.endswith(COMPRESSED):
            moved, reference = scaled[name] - before[name], full[name] - before[name]
            assert reference.abs().max() > 0
            torch.testing.assert_close(moved, 0.25 * reference, rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(scaled[name], full[name]), name  # everything else as at the run's lr


def test_scale_zero_keeps_the_compressed_weights_and_scale_one_changes_nothing(tmp_path, text_file):
    before = _initial(text_file, tmp_path)
    frozen = _train(_tiny(text_file), tmp_path / "zero", 0.0)
    moved = sorted(name for name in before if not torch.equal(frozen[name], before[name]))
    assert moved == sorted(name for name in before if not name.endswith(COMPRESSED))  # they stay bitwise
    plain = _train(_tiny(text_file), tmp_path / "plain", None)
    regrouped = _train(_tiny(text_file), tmp_path / "one", 1.0)  # split into two groups at the same lr
    assert all(torch.equal(plain[name], regrouped[name]) for name in plain)


def test_a_scaled_run_resumes_bitwise(tmp_path, text_file):
    whole = _train(_tiny(text_file, steps=4), tmp_path / "whole", 0.1)
    _train(_tiny(text_file, steps=4), tmp_path / "parts", 0.1, stop_at_step=2)
    resumed = _train(_tiny(text_file, steps=4), tmp_path / "parts", 0.1, resume=True)
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    # the checkpoint holds the split groups: resuming without the hook is refused, not silently regrouped
    _train(_tiny(text_file, steps=4), tmp_path / "again", 0.1, stop_at_step=2)
    with pytest.raises(ValueError, match="parameter group"):
        _train(_tiny(text_file, steps=4), tmp_path / "again", None, resume=True)


def test_bad_scales_and_wrong_moments_are_refused():
    from velora.core.config import VeLoRAConfig
    from velora.core.layers import apply_velora
    from velora.training.models import build_base_model

    for bad in (-0.5, math.nan, math.inf, True, "0.1"):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            scale_compressed_lr(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters()), bad)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no VeLoRA layers"):
        scale_compressed_lr(plain, torch.optim.AdamW(plain.parameters()), 0.1)
    model = build_base_model(_tiny("unused"), vocab_size=64)
    apply_velora(model, VeLoRAConfig(sub_token_size=16, target_modules="paper"))
    outside = [p for name, p in model.named_parameters() if not name.endswith(COMPRESSED)]
    with pytest.raises(ValueError, match="no VeLoRA-wrapped parameter is in the optimizer"):
        scale_compressed_lr(model, torch.optim.AdamW(outside), 0.1)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="before the first step"):
        scale_compressed_lr(model, optimizer, 0.1)


def test_the_study_records_the_scale_and_never_mixes_scales(tmp_path, text_file):
    tiny = dict(model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32, batch_size=4, steps=2,
                eval_batches=1)
    said = []
    scaled = run_study([PAPER], [0], tmp_path / "a", 1, say=said.append, compressed_lr_scale=0.5, **tiny)
    assert [lr_scale_of(r) for r in scaled] == [0.5]
    plain = run_study([PAPER], [0], tmp_path / "a", 1, say=said.append, **tiny)  # another setting: trained again
    assert [lr_scale_of(r) for r in plain] == [0.5, 1.0] and "training" in said[-2]
    assert plain[0]["val_ppl"] != plain[1]["val_ppl"]
    assert lr_scale_of({"variant": PAPER}) == 1.0  # records from before the option: the run's lr
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        run_study([PAPER], [0], tmp_path / "b", 1, compressed_lr_scale=-1.0, **tiny)
    assert not (tmp_path / "b").exists()

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fidelity.py"
    spec = importlib.util.spec_from_file_location("bench_fidelity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    first, second = tmp_path / "c", tmp_path / "d"
    for folder, record in ((first, scaled[0]), (second, {**plain[1], "seed": 1})):
        folder.mkdir()
        (folder / "runs.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(SystemExit, match="differ in their settings"):
        bench.merged_records([first, second])
