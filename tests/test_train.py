"""The training loop: every registry method trains, bitwise resume, atomic checkpoints, NaN stop, CLI --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import velora.training.checkpoint as checkpoint_module
import velora.training.loop as train_module
from velora.methods.registry import base_methods, method_names, parse_method
from velora.training.loop import (
    TrainConfig,
    TrainingDiverged,
    latest_checkpoint,
    load_training_state,
    lr_factor,
    train,
)


def tiny(text_file: Path, **changes) -> TrainConfig:
    settings = dict(model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32, batch_size=4, steps=6,
                    lr=3e-3, warmup_steps=2, eval_batches=2, velora={"sub_token_size": 16, "target_modules": "paper"})
    settings.update(changes)
    return TrainConfig(**settings)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bitwise equal: {different[:5]}"


def test_lr_schedule_warmup_then_cosine_to_floor():
    config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(55, config) == pytest.approx(0.55)
    assert lr_factor(100, config) == pytest.approx(0.1)


def test_registry_covers_every_method(text_file):
    """Every trainable name the registry lists prepares, steps and changes the trainable weights."""
    trainable_bases = {name for name, base in base_methods().items() if base.trainable}
    names = [n for n in method_names() if parse_method(n).base in trainable_bases]
    assert {"full", "velora", "lora", "lora+velora", "dora", "galore", "flora", "gradnormlorp",
            "full+ckpt"} <= set(names)
    for name in names:
        before = {}

        def remember(model, before=before):
            before.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

        result = train(tiny(text_file, method=name, steps=2), measure=False, on_model_ready=remember)
        model = result["_model"]
        changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        assert changed, f"{name}: no trainable parameter changed"
        assert result["val_ppl"] > 1 and torch.isfinite(torch.tensor(result["final_loss"])), name


@pytest.mark.parametrize("method, extra", [
    ("full", {}),
    ("velora", {}),
    ("lora+velora", {}),
    ("velora", {"velora": {"sub_token_size": 16, "rank": 16, "coefficient_bits": 8, "target_modules": "paper"}}),
    ("lora+velora", {"velora": {"sub_token_size": 16, "rank": 8, "coefficient_bits": 4, "target_modules": "paper"}}),
    # issue 17's fine-tuning configuration (per-group SVD directions, r = 4, 8-bit z, padded groups) on QLoRA, at
    # M = D/8 for the tiny widths
    ("qlora+velora", {"velora": {"num_groups": 8, "pad": True, "rank": 4, "coefficient_bits": 8, "init": "svd",
                                 "per_group_directions": True, "target_modules": "paper"}}),
    ("galore", {"options": {"update_proj_gap": 2}}),
    ("flora", {"options": {"flora_kappa": 2}}),
    ("full", {"accumulation_steps": 2, "options": {"flora_accumulation": True, "flora_rank": 4}}),
])
def test_resume_is_bitwise_identical(tmp_path, text_file, method, extra):
    config = tiny(text_file, method=method, **extra)
    straight = train(config, tmp_path / "straight", measure=False)
    train(config, tmp_path / "split", measure=False, stop_at_step=3)
    assert latest_checkpoint(tmp_path / "split").name == "step-0000003"
    resumed = train(config, tmp_path / "split", resume=True, measure=False)
    _assert_bitwise(_state(straight["_model"]), _state(resumed["_model"]))
    a = load_training_state(latest_checkpoint(tmp_path / "straight"))["optimizer"]["state"]
    b = load_training_state(latest_checkpoint(tmp_path / "split"))["optimizer"]["state"]
    for key in a:
        for name, value in a[key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key][name]), (key, name)
    assert resumed["loss_curve"] == straight["loss_curve"]  # the log continues, no duplicated rows
    assert resumed["val_ppl"] == straight["val_ppl"]


def test_resume_refuses_changed_arguments(tmp_path, text_file):
    train(tiny(text_file, steps=2), tmp_path / "run", measure=False)
    with pytest.raises(ValueError, match="differ from the saved run in \\['lr'\\]"):
        train(tiny(text_file, steps=2, lr=1e-2), tmp_path / "run", resume=True, measure=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(text_file, steps=2), tmp_path / "run", measure=False)


def test_resume_compares_the_velora_section_as_the_config_it_builds(tmp_path, text_file):
    """A run saved with a short VeLoRA section (the Python API, or the CLI before it wrote every VeLoRA flag) resumes
    under a section that spells the same defaults out; a real change in it is still refused."""
    short = {"sub_token_size": 16, "target_modules": "paper"}
    spelled = {**short, "init": "batch_average_once", "rank": 1, "per_group_directions": False,
               "reestimate_every": None}
    train(tiny(text_file, method="velora", steps=2, velora=short), tmp_path / "run", measure=False, stop_at_step=1)
    assert train(tiny(text_file, method="velora", steps=2, velora=spelled), tmp_path / "run", resume=True,
                 measure=False)["status"] == "completed"
    train(tiny(text_file, method="velora", steps=2, velora=short), tmp_path / "other", measure=False, stop_at_step=1)
    with pytest.raises(ValueError, match="differ from the saved run in \\['velora'\\]"):
        train(tiny(text_file, method="velora", steps=2, velora={**spelled, "rank": 2}), tmp_path / "other",
              resume=True, measure=False)


def test_crash_mid_checkpoint_keeps_previous_checkpoint_loadable(tmp_path, text_file, monkeypatch):
    config = tiny(text_file, steps=4)
    out = tmp_path / "run"
    first = train(config, out, measure=False, stop_at_step=2)
    good = _state(first["_model"])

    def crash_halfway(state, path):
        torch.save(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # a torn write ...
        raise OSError("disk full")  # ... then the process dies

    monkeypatch.setattr(checkpoint_module, "_write_training_state", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        train(config, out, resume=True, measure=False)
    checkpoint = latest_checkpoint(out)
    assert checkpoint.name == "step-0000002"
    state = load_training_state(checkpoint)
    assert int(state["step"]) == 2
    from safetensors.torch import load_file

    _assert_bitwise(good, {k: v for k, v in load_file(str(checkpoint / "model.safetensors")).items()})
    monkeypatch.undo()
    finished = train(config, out, resume=True, measure=False)  # and the run still completes
    assert latest_checkpoint(out).name == "step-0000004" and finished["steps"] == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, text_file):
    config = tiny(text_file, steps=8, save_every=1)
    calls = {"n": 0}

    def poison_from_step_4(model):
        def hook(module, inputs, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] > 3 else output

        model.model.norm.register_forward_hook(hook)  # one call per training forward

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*last good checkpoint.*step-0000003"):
        train(config, tmp_path / "run", measure=False, on_model_ready=poison_from_step_4)
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "step-0000003"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values()
               if t.is_floating_point())


def test_cli_json_schema_and_loss_falls_on_a_local_text_file(tmp_path, text_file, capsys):
    from velora.cli import main

    code = main(["train", "--data", str(text_file), "--tokenizer", "byte", "--model", "llama-tiny",
                 "--steps", "40", "--batch-size", "8", "--seq-len", "32", "--lr", "3e-3", "--eval-batches", "2",
                 "--out", str(tmp_path / "run"), "--json", "--no-progress", "--threads", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key, kind in (("initial_loss", float), ("final_loss", float), ("val_ppl", float),
                      ("activation_bytes", int), ("peak_bytes", int), ("tokens_per_s", float)):
        assert isinstance(result[key], kind), key
    assert result["peak_bytes"] > result["activation_bytes"] > 0
    assert result["final_loss"] < result["initial_loss"] - 1.0  # byte-level loss starts near ln(257) = 5.55
    assert result["val_ppl"] < 257
    assert result["data_fingerprint"]["source"] == "local"
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == 41
    assert (tmp_path / "run" / "checkpoints" / "step-0000040" / "model.safetensors").exists()


def test_cli_bad_method_is_one_line_error(capsys, text_file):
    from velora.cli import main

    assert main(["train", "--method", "lora+galore", "--data", str(text_file)]) == 2
    err = capsys.readouterr().err
    assert "combines base methods" in err and len(err.strip().splitlines()) == 1


def test_cli_flora_project_reaches_the_accumulator_and_bad_side_is_one_line_error(tmp_path, capsys, text_file):
    from velora.cli import main

    common = ["train", "--method", "full", "--data", str(text_file), "--tokenizer", "byte", "--steps", "1",
              "--seq-len", "16", "--batch-size", "2", "--accumulation-steps", "2", "--flora-accumulation",
              "--flora-rank", "8", "--eval-batches", "1", "--no-progress", "--no-memory", "--json"]
    assert main([*common, "--flora-project", "sideways", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "project='sideways'" in err and len(err.strip().splitlines()) == 1
    results = {}
    for side in ("smaller", "larger"):
        assert main([*common, "--flora-project", side, "--out", str(tmp_path / side)]) == 0
        results[side] = json.loads(capsys.readouterr().out)
    # llama-tiny (2 layers): 4 square 64 x 64 attention weights keep 64 x 8 either way; its 3 MLP weights
    # (64 x 192, 192 x 64) keep 192 x 8 with the smaller side projected and 64 x 8 with the larger
    attention = 4 * 64 * 8
    assert results["smaller"]["accumulation_buffer_bytes"] == 2 * 4 * (attention + 3 * 192 * 8)
    assert results["larger"]["accumulation_buffer_bytes"] == 2 * 4 * (attention + 3 * 64 * 8)
    assert results["smaller"]["naive_accumulation_bytes"] == results["larger"]["naive_accumulation_bytes"]


def test_cli_flora_projection_reaches_the_accumulator_and_bad_kind_is_one_line_error(tmp_path, capsys, text_file):
    from velora.cli import main

    common = ["train", "--method", "full", "--data", str(text_file), "--tokenizer", "byte", "--steps", "1",
              "--seq-len", "16", "--batch-size", "2", "--accumulation-steps", "2", "--flora-accumulation",
              "--flora-rank", "8", "--eval-batches", "1", "--no-progress", "--no-memory"]
    assert main([*common, "--flora-projection", "uniform", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--flora-projection='uniform'" in err and len(err.strip().splitlines()) == 1
    for flags, orthogonal in (([], True), (["--flora-projection", "gaussian"], False),
                              (["--flora-projection", "orthonormal"], True)):
        out = tmp_path / ("-".join(flags) or "default")
        assert main([*common, *flags, "--out", str(out)]) == 0
        state = load_training_state(latest_checkpoint(out))
        assert state["accumulator"]["orthogonal"] is orthogonal, flags


def test_eval_batches_zero_scores_the_whole_validation_split(text_file):
    """eval_batches=0 is the token-weighted cross-entropy over every validation block, recomputed here by hand;
    a negative count is a one-line error."""
    config = tiny(text_file, steps=2, eval_batches=0)
    result = train(config, None, progress=False, measure=False, tensorboard=False)
    model, validation = result["_model"], train_module.load_data(config).validation
    assert len(validation) > 2 * config.batch_size  # more than one batch, so "all" differs from the first
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, (len(validation) // config.batch_size) * config.batch_size, config.batch_size):
            batch = validation.blocks[start:start + config.batch_size]
            total += float(model(input_ids=batch, labels=batch).loss) * batch.shape[0] * (batch.shape[1] - 1)
            count += batch.shape[0] * (batch.shape[1] - 1)
    assert result["val_loss"] == pytest.approx(total / count, rel=1e-6)
    first = train_module.evaluate(model, validation, config.batch_size, 1)
    assert first != pytest.approx(result["val_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="eval_batches=-1"):
        tiny(text_file, eval_batches=-1)


def test_cli_velora_direction_flags_reach_every_layer_and_a_bad_value_is_one_line(tmp_path, text_file, capsys):
    """--velora-rank / --velora-per-group / --velora-reestimate-every build the layers they name: per-group top-2
    directions (G, M, 2), re-estimated on every one of the 3 steps x 2 micro-batches (the saved counter)."""
    from safetensors.torch import load_file

    from velora.cli import main

    out = tmp_path / "run"
    assert main(["train", "--method", "velora", "--data", str(text_file), "--tokenizer", "byte", "--model",
                 "llama-tiny", "--steps", "3", "--batch-size", "2", "--accumulation-steps", "2", "--seq-len", "16",
                 "--eval-batches", "1", "--sub-token-size", "8", "--velora-init", "svd", "--velora-rank", "2",
                 "--velora-per-group", "--velora-reestimate-every", "1", "--out", str(out), "--no-progress",
                 "--no-memory"]) == 0
    saved = load_file(str(out / "checkpoints" / "step-0000003" / "model.safetensors"))
    directions = {k: v for k, v in saved.items() if k.endswith("velora_v")}
    steps = {k: int(v) for k, v in saved.items() if k.endswith("velora_step")}
    assert directions and {tuple(v.shape[1:]) for v in directions.values()} == {(8, 2)}
    assert all(v.shape[0] > 1 for v in directions.values())  # one (M, r) set per group
    assert len(steps) == len(directions) and set(steps.values()) == {6}  # every training forward counted
    config = json.loads((out / "config.json").read_text())["velora"]
    assert (config["rank"], config["per_group_directions"], config["reestimate_every"]) == (2, True, 1)
    capsys.readouterr()
    assert main(["train", "--method", "velora", "--data", str(text_file), "--velora-reestimate-every", "0",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "reestimate_every=0" in err and len(err.strip().splitlines()) == 1


def test_cli_coefficient_flags_reach_the_velora_config():
    """train's --velora-coefficient-bits / --velora-coefficient-scales and diagnose's --coefficient-bits /
    --coefficient-scales build the VeLoRAConfig they name; without the scales flag the config's default holds."""
    import argparse

    from velora.cli import diagnose, train
    from velora.core.config import VeLoRAConfig

    parsers = {}
    for name, module in (("train", train), ("diagnose", diagnose)):
        parsers[name] = argparse.ArgumentParser()
        module.add_arguments(parsers[name])
    for extra, scales in (([], "token_and_column"), (["--velora-coefficient-scales", "token"], "token")):
        args = parsers["train"].parse_args(["--method", "velora", "--sub-token-size", "4", "--velora-rank", "4",
                                  "--velora-coefficient-bits", "4", *extra])
        config = VeLoRAConfig.from_dict(train.config_from_args(args).velora)
        assert (config.rank, config.coefficient_bits, config.coefficient_scales) == (4, 4, scales)
    for extra, scales in (([], "token_and_column"), (["--coefficient-scales", "token"], "token")):
        args = parsers["diagnose"].parse_args(["--model", "llama-tiny", "--coefficient-bits", "8", *extra])
        config = VeLoRAConfig.from_dict(diagnose._config(args).velora)
        assert (config.coefficient_bits, config.coefficient_scales) == (8, scales)
