"""The training loop refuses or survives what a careless or hostile setup does to it (issues #13, #18):
changed data on resume, symlinks in the run folder, a full disk, corrupt checkpoints, a finished run, an
exploding loss, a model that cannot fit, mistyped models; each ends in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import velora.training.checkpoint as checkpoint_module
from velora.training.loop import TrainConfig, TrainingDiverged, latest_checkpoint, load_training_state, lr_factor, train
from velora.training.runfiles import RunFolderError, temporary_step_folder


def tiny(text_file: Path, **changes) -> TrainConfig:
    settings = dict(model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32, batch_size=4, steps=4,
                    lr=3e-3, warmup_steps=2, eval_batches=2, velora={"sub_token_size": 16, "target_modules": "paper"})
    settings.update(changes)
    return TrainConfig(**settings)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from velora.cli import main

    capsys.readouterr()  # drop what earlier calls printed
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- #13.2 resume: the saved tokenizer, the data fingerprint ---------------------------------------------


def test_resume_uses_the_saved_tokenizer_and_refuses_changed_text(tmp_path, text_file):
    from tokenizers import Tokenizer

    from velora.training.corpus import load_corpus
    from velora.training.tokenizer import BPETokenizer, train_bpe

    data = tmp_path / "corpus.txt"
    shutil.copy(text_file, data)
    config = tiny(data, tokenizer="bpe", vocab_size=320, bpe_train_chars=30_000)
    out, cache = tmp_path / "run", tmp_path / "cache"
    train(config, out, measure=False, stop_at_step=2, cache_dir=cache)
    saved = tmp_path / "saved-tokenizer.json"
    shutil.copy(out / "tokenizer.json", saved)
    added = "\n".join(f"def helper_{i}(value):\n    return value * {i} + {i * i}\n" for i in range(400))
    data.write_text(added + data.read_text())  # new text at the front: inside the BPE training sample

    with pytest.raises(ValueError, match=r"training text changed since this run started.*--allow-data-change"):
        train(config, out, resume=True, measure=False, cache_dir=cache)
    resumed = train(config, out, resume=True, measure=False, cache_dir=cache, allow_data_change=True)

    # reference: the tokenizer saved at the start encodes exactly as the one the resumed run used ...
    sample = [text_file.read_text()[:3000], added[:3000]]
    reference = Tokenizer.from_file(str(saved))
    assert resumed["_tokenizer"].encode_batch(sample) == [e.ids for e in reference.encode_batch(sample)]
    # ... while the tokenizer old code retrained on the changed text maps ids to other strings
    retrained = BPETokenizer(train_bpe(load_corpus(str(data)).train, 320, 30_000), "bpe-320")
    assert retrained.encode_batch(sample) != resumed["_tokenizer"].encode_batch(sample)
    history = json.loads((out / "run.json").read_text())["history"]
    assert [h["event"] for h in history] == ["start", "resume"] and history[1]["changed"] == {"data_changed": True}
    assert resumed["steps"] == 4


def test_resume_refuses_the_stdlib_of_another_python(tmp_path, monkeypatch):
    config = TrainConfig(model="llama-tiny", data="stdlib", tokenizer="byte", max_train_chars=40_000,
                         max_val_chars=4_000, seq_len=32, batch_size=2, steps=3, warmup_steps=1, eval_batches=1)
    train(config, tmp_path / "run", measure=False, stop_at_step=1)
    import velora.training.corpus

    monkeypatch.setattr(velora.training.corpus.platform, "python_version", lambda: "3.99.0")
    with pytest.raises(ValueError, match=r"training text changed.*python: 3\.\d+\.\d+ -> 3\.99\.0"):
        train(config, tmp_path / "run", resume=True, measure=False)


# ---- #13.3 symlinks in the run folder ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["log.csv", "tokenizer.json", "config.json", "run.json", "result.json"])
def test_a_symlinked_run_file_is_refused_and_its_target_unchanged(tmp_path, text_file, name):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(outside)
    with pytest.raises(RunFolderError, match=f"{name} is a symlink"):
        train(tiny(text_file, steps=2), out, measure=False, tensorboard=False)
    assert outside.read_text() == "keep me\n"
    assert (out / name).is_symlink()


@pytest.mark.parametrize("name", ["checkpoints", "tensorboard"])
def test_a_symlinked_run_folder_is_refused_and_nothing_lands_outside(tmp_path, text_file, name):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunFolderError, match=f"{name} is a symlink"):
        train(tiny(text_file, steps=2), out, measure=False)
    assert list(outside.iterdir()) == []


def test_a_latest_pointer_leading_outside_the_run_folder_is_refused(tmp_path, text_file):
    config = tiny(text_file)
    out = tmp_path / "run"
    train(config, out, measure=False, stop_at_step=2)
    planted = tmp_path / "planted"  # a complete checkpoint outside the run folder
    shutil.copytree(latest_checkpoint(out), planted)
    (out / "checkpoints" / "latest").write_text("../../planted")
    with pytest.raises(ValueError, match=r"names '\.\./\.\./planted', not a step-NNNNNNN folder"):
        train(config, out, resume=True, measure=False)
    (out / "checkpoints" / "latest").unlink()
    (out / "checkpoints" / "latest").symlink_to(tmp_path / "pointer.txt")
    (tmp_path / "pointer.txt").write_text("step-0000002")
    with pytest.raises(RunFolderError, match="latest is a symlink"):
        train(config, out, resume=True, measure=False)


# ---- #13.13 disk full / read-only folder ------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_disk_full_while_checkpointing_is_one_line_and_resume_works(tmp_path, text_file, monkeypatch, capsys):
    config = tiny(text_file)
    out = tmp_path / "run"
    train(config, out, measure=False, stop_at_step=2)
    good = load_training_state(latest_checkpoint(out))

    def disk_full(model, path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint_module, "_write_model", disk_full)
    with pytest.raises(RunFolderError) as caught:
        train(config, out, resume=True, measure=False)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in message  # the CLI prints it as one line
    assert "no space left" in message and "step-0000002 is kept" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002"]  # no temporary
    assert torch.equal(load_training_state(latest_checkpoint(out))["rng"], good["rng"])

    code, _, err = _cli(capsys, "train", "--model", "llama-tiny", "--data", str(text_file), "--tokenizer", "byte",
                        "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--no-progress", "--no-memory",
                        "--out", str(tmp_path / "cli-run"))
    assert "no space left" in _one_line_error(code, err)
    monkeypatch.undo()

    # temporaries a killed run left behind are removed at the next start, and the run completes
    pid = _dead_pid()
    temporary_step_folder(out / "checkpoints", 4, pid).mkdir()  # the name both checkpoint writers (DDP, FSDP2) use
    assert temporary_step_folder(out / "checkpoints", 4, pid).name == f".tmp-step-0000004-{pid}"
    (out / f".config.json.tmp{pid}").write_text("{")
    (out / "checkpoints" / f".latest.tmp{pid}").write_text("step-0000004")
    finished = train(config, out, resume=True, measure=False)
    assert finished["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000004"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_read_only_run_folder_is_one_line(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        probe = out / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("this user (root?) can write into a read-only folder")
        except PermissionError:
            pass
        code, _, err = _cli(capsys, "train", "--model", "llama-tiny", "--data", str(text_file), "--tokenizer",
                            "byte", "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--no-progress",
                            "--no-memory", "--out", str(out))
        assert "not writable" in _one_line_error(code, err)
    finally:
        out.chmod(0o755)


# ---- #13.15 + #18.13 divergence, and resuming with a lower learning rate ---------------------------------


def test_exploding_finite_loss_stops_as_diverged(tmp_path, text_file, capsys):
    config = tiny(text_file, steps=12, lr=100.0)
    with pytest.raises(TrainingDiverged, match=r"has stayed above .* for 3 steps"):
        train(config, tmp_path / "run", measure=False)
    assert not (tmp_path / "run" / "result.json").exists()
    code, out, err = _cli(capsys, "train", "--model", "llama-tiny", "--data", str(text_file), "--tokenizer", "byte",
                          "--seq-len", "32", "--batch-size", "4", "--steps", "12", "--lr", "100", "--no-progress",
                          "--no-memory", "--json", "--out", str(tmp_path / "cli"))
    assert code == 1 and json.loads(out)["status"] == "diverged"


def test_divergence_message_points_at_allow_lr_change_and_that_resume_uses_the_new_lr(tmp_path, text_file):
    config = tiny(text_file, steps=8, save_every=1)
    out = tmp_path / "run"
    calls = {"n": 0}

    def poison_from_step_5(model):
        def hook(module, inputs, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] > 4 else output

        model.model.norm.register_forward_hook(hook)

    with pytest.raises(TrainingDiverged, match=r"step-0000004\. Lower --lr.*--resume --allow-lr-change"):
        train(config, out, measure=False, on_model_ready=poison_from_step_5)
    lower = tiny(text_file, steps=8, save_every=1, lr=1e-3, warmup_steps=3)
    with pytest.raises(ValueError, match=r"differ from the saved run in \['lr', 'warmup_steps'\].*--allow-lr-change"):
        train(lower, out, resume=True, measure=False)
    with pytest.raises(ValueError, match=r"differ from the saved run in \['seed'\]"):
        train(tiny(text_file, steps=8, save_every=1, lr=1e-3, seed=1), out, resume=True, measure=False,
              allow_lr_change=True)
    with pytest.raises(ValueError, match="only apply with resume=True"):
        train(lower, tmp_path / "fresh", measure=False, allow_lr_change=True)
    result = train(lower, out, resume=True, measure=False, allow_lr_change=True)
    assert result["steps"] == 8
    # the optimizer stepped with the new schedule (load_state_dict alone would bring back the old lr)
    groups = load_training_state(latest_checkpoint(out))["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(1e-3 * lr_factor(7, lower), rel=1e-12) for g in groups)
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    history = json.loads((out / "run.json").read_text())["history"]
    assert history[-1]["changed"] == {"lr": [3e-3, 1e-3], "warmup_steps": [2, 3]} and history[-1]["step"] == 4


def test_divergence_rule_tolerates_a_short_spike_and_fires_on_a_sustained_one():
    from velora.training.guards import DivergenceRule

    rule = DivergenceRule(vocab_size=257)  # ceiling ln 257 + 2 = 7.549
    assert [rule.train_loss(s, loss) for s, loss in enumerate([5.5, 9.0, 9.0, 5.0, 9.0, 9.0], 1)] == [None] * 6
    assert rule.train_loss(7, 9.0) is not None and rule.first_step_above == 5
    assert rule.validation_loss(8, float("inf")) and rule.validation_loss(8, 7.0) is None


# ---- #18.9 resume a finished run; #18.10 corrupt checkpoints ---------------------------------------------


def test_resuming_a_finished_run_says_it_is_finished(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    train(tiny(text_file, steps=2), out, measure=False)
    with pytest.raises(ValueError, match=r"is finished \(2 of 2 steps\).*--init-from"):
        train(tiny(text_file, steps=2), out, resume=True, measure=False)
    argv = ["train", "--model", "llama-tiny", "--data", str(text_file), "--tokenizer", "byte", "--seq-len", "32",
            "--batch-size", "4", "--steps", "2", "--no-progress", "--no-memory", "--out", str(tmp_path / "cli")]
    assert _cli(capsys, *argv)[0] == 0
    code, _, err = _cli(capsys, *argv, "--resume")  # crashed formatting tokens_per_s=None before
    assert "is finished" in _one_line_error(code, err)


@pytest.mark.parametrize("name, damage", [("model.safetensors", "truncate"), ("model.safetensors", "garbage"),
                                          ("training_state.pt", "truncate"), ("training_state.pt", "garbage")])
def test_corrupt_checkpoint_files_are_named_with_what_to_do(tmp_path, text_file, name, damage):
    config = tiny(text_file)
    out = tmp_path / "run"
    train(config, out, measure=False, stop_at_step=2)
    file = latest_checkpoint(out) / name
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    with pytest.raises(ValueError, match=rf"{name} is truncated or corrupt.*no earlier checkpoint"):
        train(config, out, resume=True, measure=False)
    shutil.copytree(latest_checkpoint(out), out / "checkpoints" / "step-0000001")  # an earlier one exists
    with pytest.raises(ValueError, match=r"resume from an earlier one \(step-0000001"):
        train(config, out, resume=True, measure=False)
    if name == "model.safetensors":  # --init-from reads the same file
        with pytest.raises(ValueError, match=rf"{name} is truncated or corrupt"):
            train(tiny(text_file, init_from=str(out)), tmp_path / "finetune", measure=False)


# ---- #18.11 long lines ------------------------------------------------------------------------------------


def test_a_single_line_file_is_split_by_characters(tmp_path, text_file):
    import velora.training.corpus

    one_line = tmp_path / "one-line.txt"
    text = text_file.read_text().replace("\n", " ") * 3  # ~135 KB, no newline
    one_line.write_text(text)
    corpus = velora.training.corpus.load_corpus(str(one_line))
    assert corpus.train and corpus.validation
    assert all(len(piece) <= velora.training.corpus.LOCAL_PIECE_CHARS for piece in corpus.train + corpus.validation)
    assert sum(len(p) for p in corpus.train + corpus.validation) == len(text)
    result = train(tiny(one_line, steps=2), measure=False)
    assert result["status"] == "completed"


# ---- #18.12 a run that cannot fit ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_model_far_too_large_is_refused_before_it_is_built(text_file, monkeypatch):
    """Weights that alone exceed the memory are refused at once, without building the model (the RSS barely grows)
    or planning a step (the planner's refusal is the next test's)."""
    import resource

    import velora.training.guards as guards
    from velora.training.models import build_config

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weights = guards.parameter_count(build_config("llama-7b", vocab_size=257)) * 4  # fp32, byte-level vocabulary
    monkeypatch.setattr(guards, "available_memory", lambda device: (weights - 2**20, "in this test"))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"llama-7b --method full needs \d+\.\d GiB for its float32 weights alone "
                                         r"\(6\.\d\d B parameters; .* is in this test; .*--ignore-memory-check"):
        train(tiny(text_file, model="llama-7b", seq_len=64, batch_size=1), measure=False)
    assert time.perf_counter() - started < 30  # no fake-tensor step
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 2 * 2**20  # KiB: < 2 GiB grown


def test_memory_check_uses_the_planner_and_can_be_overridden(text_file, monkeypatch):
    import velora.training.guards as guards
    from velora.memory.planner import plan
    from velora.training.models import build_config

    planned = plan(build_config("llama-tiny", vocab_size=257), "full", batch=4, seq=32)["peak_bytes"]  # byte ids
    monkeypatch.setattr(guards, "rough_step_bytes", lambda *args: planned * 10)  # too close to skip the exact plan
    monkeypatch.setattr(guards, "available_memory", lambda device: (planned - 1, "in this test"))
    with pytest.raises(ValueError, match=r"needs a planned peak of .* GiB is in this test"):
        train(tiny(text_file, steps=1), measure=False)
    monkeypatch.setattr(guards, "available_memory", lambda device: (planned + 2**20, "in this test"))
    assert train(tiny(text_file, steps=1), measure=False)["status"] == "completed"
    monkeypatch.setattr(guards, "available_memory", lambda device: (1, "in this test"))
    assert train(tiny(text_file, steps=1), measure=False, memory_check=False)["status"] == "completed"


# ---- #18.14 bad --model / --out / config.json --------------------------------------------------------------


def test_mistyped_preset_is_one_line_listing_presets_without_a_hub_call(text_file, capsys):
    started = time.perf_counter()
    code, _, err = _cli(capsys, "train", "--model", "llama-7bb", "--data", str(text_file), "--no-progress")
    line = _one_line_error(code, err)
    assert "did you mean 'llama-7b'" in line and "llama-tiny" in line and time.perf_counter() - started < 5
    code, _, err = _cli(capsys, "train", "--model", "./no/such/config.json", "--data", str(text_file))
    assert "does not exist" in _one_line_error(code, err)


def test_resume_without_out_is_one_line_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "train", "--resume")
    assert "--resume needs --out" in _one_line_error(code, err)
    code, _, err = _cli(capsys, "train", "--resume", "--out", "missing-run")
    assert "does not exist" in _one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


def test_bad_model_config_json_names_the_file(tmp_path, text_file, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"model_type": "llama", "hidden_size": 64,')
    code, _, err = _cli(capsys, "train", "--model", str(broken), "--data", str(text_file), "--tokenizer", "byte")
    assert str(broken) in _one_line_error(code, err) and "not valid JSON" in err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "llamma", "hidden_size": 64}))
    code, _, err = _cli(capsys, "train", "--model", str(unknown), "--data", str(text_file), "--tokenizer", "byte")
    line = _one_line_error(code, err)
    assert "model_type='llamma'" in line and "'llama'" in line and len(line) < 400
    run = tmp_path / "run"
    train(tiny(text_file), run, measure=False, stop_at_step=1)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{run / 'config.json'} is not valid JSON"):
        train(tiny(text_file), run, resume=True, measure=False)


# ---- #18.15 help, dtype spellings, plan units, progress under torchrun ------------------------------------


@pytest.mark.parametrize("command", ["train", "plan", "demo", "compare", "bench", "diagnose"])
def test_help_states_every_default(command):
    import argparse
    import importlib

    from velora.cli import COMMANDS, DefaultsHelpFormatter

    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
            assert "default" in formatter._get_help_string(action).lower(), action.option_strings
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"


def test_velora_init_lists_choices_and_dtype_spellings_agree(capsys):
    import argparse

    from velora.cli.plan import add_arguments as plan_arguments
    from velora.cli.train import add_arguments as train_arguments
    from velora.core.config import INIT_STRATEGIES

    train_parser, plan_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
    train_arguments(train_parser)
    plan_arguments(plan_parser)
    init = next(a for a in train_parser._actions if a.dest == "velora_init")
    assert tuple(init.choices) == INIT_STRATEGIES
    for spelling in ("bf16", "bfloat16"):
        assert train_parser.parse_args(["--dtype", spelling]).dtype == "bfloat16"
        assert plan_parser.parse_args(["--model", "x", "--dtype", spelling]).dtype == "bf16"
    assert TrainConfig(dtype="bf16").dtype == "bfloat16"
    with pytest.raises(SystemExit):
        train_parser.parse_args(["--dtype", "fp16"])  # training in pure fp16 is not offered
    assert "not supported here" in capsys.readouterr().err


def test_plan_table_picks_mib_or_gib(capsys):
    from velora.cli.plan import render
    from velora.memory.peak import CATEGORIES

    def result(peak: int) -> dict:
        breakdown = {name: peak // len(CATEGORIES) for name in CATEGORIES}
        return {"model": "m", "method": "full", "optimizer": "adamw", "batch": 1, "seq": 8, "dtype": "fp32",
                "peak_bytes": peak, "breakdown": breakdown, "saved_activation_bytes": peak // 5,
                "parameter_count": 10, "trainable_parameter_count": 10, "notes": [], "seconds": 0.1}

    render(result(3 * 2**20))
    small = capsys.readouterr().out
    assert "MiB" in small and "GiB" not in small and "3.00" in small
    render(result(5 * 2**30))
    large = capsys.readouterr().out
    assert "GiB" in large and "MiB" not in large and "5.00" in large


@pytest.mark.slow
def test_only_rank_zero_draws_progress_under_torchrun(torchrun_train):
    _, done = torchrun_train  # conftest: one 2-rank launch shared with test_distributed (a launch costs ~25 s CPU)
    assert done.returncode == 0, done.stderr[-3000:]
    bars = [line for line in done.stderr.splitlines() if line.lstrip().startswith("flora+velora ")]
    assert len(bars) == 1, done.stderr[-2000:]


def test_the_pre_check_measures_a_preset_once_per_process_and_a_config_file_every_time(tmp_path):
    """The size the memory pre-check plans with equals the model train builds; presets are measured once per
    (preset, vocabulary, sequence length), a config.json is re-read on every run (it may have changed)."""
    import velora.training.guards as guards
    from velora.training.models import build_config, build_model

    guards._preset_size.cache_clear()
    run = tiny(tmp_path / "unused.txt", model="llama-tiny")
    size = guards._size(run, 300)
    model = build_model(build_config("llama-tiny", vocab_size=300))
    assert size == (sum(p.numel() for p in model.parameters()), 64, 2, 300)
    assert guards._size(run, 300) == size and guards._preset_size.cache_info().hits == 1
    assert guards._size(run, 301)[0] == size[0] + 2 * 64  # another vocabulary: embedding and head rows
    config_file = tmp_path / "model.json"
    for layers in (2, 3):
        config_file.write_text(json.dumps({**build_config("llama-tiny").to_dict(), "num_hidden_layers": layers}))
        assert guards._size(tiny(tmp_path / "unused.txt", model=str(config_file)), 300)[2] == layers
    assert guards._preset_size.cache_info().misses == 2  # the two presets; the file never went through the cache


def test_a_start_that_fails_before_step_one_leaves_no_run_folder(tmp_path, text_file, capsys):
    """A bad model config used to leave ``OUT/config.json`` behind (and, without --out, a stub runs/<method>-<time>
    in the working directory); a folder that already existed, or holds anything else, is left as it was."""
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "llamma", "hidden_size": 64}))
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", "--model", str(unknown), "--data", str(text_file), "--tokenizer", "byte",
                        "--out", str(out))
    assert code == 2 and "llamma" in err and not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, "train", "--model", str(unknown), "--data", str(text_file), "--tokenizer", "byte",
                        "--out", str(kept))
    assert code == 2 and (kept / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="fewer than one block"):  # fails after the config is written
        train(tiny(text_file, seq_len=10**6), out / "a" / "b", measure=False)
    assert not out.exists()  # with the parents it created
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "elsewhere")  # a symlink as --out is never created through nor removed
    with pytest.raises(ValueError):
        train(tiny(text_file, seq_len=10**6), dangling, measure=False)
    assert dangling.is_symlink() and not (tmp_path / "elsewhere").exists()
