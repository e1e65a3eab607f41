"""--init-from a run of any method: the target gets the source's base weights with its adapters merged (checked
against peft's merge_and_unload / merge_gradnorm_lorp / remove_velora of the trained source), v where it wraps the
same layers, says in one line what it took and left, and starts training. Four sources trained once."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from velora import merge_gradnorm_lorp, remove_velora, velora_modules  # noqa: E402
from velora.training.loop import TrainConfig, train  # noqa: E402

METHODS = ("velora", "lora", "gradnormlorp", "full")


def tiny(text_file: Path, **changes) -> TrainConfig:
    settings = dict(model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32, batch_size=4, steps=2,
                    lr=1e-2, warmup_steps=1, eval_batches=1, velora={"sub_token_size": 16, "target_modules": "paper"},
                    options={"lora_rank": 4, "gradnorm_rank": 4, "gradnorm_proj_rank": 2, "gradnorm_alpha": 8.0})
    settings.update(changes)
    return TrainConfig(**settings)


def merged_state(model, method: str) -> dict[str, torch.Tensor]:
    """The trained source folded into a plain model by each method's own merge."""
    model = copy.deepcopy(model)
    if method == "lora":
        model = model.merge_and_unload()
    elif method == "gradnormlorp":
        model = merge_gradnorm_lorp(model)
    elif method == "velora":
        model = remove_velora(model)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, text_file):
    root = tmp_path_factory.mktemp("sources")
    runs = {}
    for method in METHODS:
        result = train(tiny(text_file, method=method), root / method, measure=False, tensorboard=False,
                       log=lambda message: None)
        runs[method] = (root / method, result["_model"])
    return runs


@pytest.mark.parametrize("target", METHODS)
@pytest.mark.parametrize("source", METHODS)
def test_init_from_any_method_into_any_method_starts_training(sources, text_file, source, target):
    folder, source_model = sources[source]
    messages, seen = [], {}

    def inspect(model):
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["v"] = {name: layer.velora_v.clone() for name, layer in velora_modules(model).items()}

    result = train(tiny(text_file, method=target, init_from=str(folder), lr=1e-3), None, measure=False,
                   tensorboard=False, log=messages.append, on_model_ready=inspect)
    assert result["status"] == "completed" and len(result["loss_curve"]) == 2
    assert all(torch.isfinite(torch.tensor([loss for _, loss in result["loss_curve"]])))

    summary = [m for m in messages if m.startswith("--init-from")]
    assert len(summary) == 1 and "\n" not in summary[0]
    assert f"({source} run, step 2): took 21 base tensors" in summary[0]  # llama-tiny: 21 tensors
    merged = {"lora": "14 with LoRA merged", "gradnormlorp": "14 with GradNormLoRP merged"}.get(source)
    assert (merged in summary[0]) if merged else "merged" not in summary[0]
    assert "left the optimizer state, the step count" in summary[0]

    expected = merged_state(source_model, source)
    if target == "full":  # the bare model: exactly the merged source
        assert seen["state"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(seen["state"][key], value), key
    if target == "velora":
        saved_v = {name: layer.velora_v for name, layer in velora_modules(source_model).items()}
        if source == "velora":  # same layers, same layout: v taken, not re-initialised from a new batch
            assert "v of 4/4 VeLoRA layers" in summary[0]
            assert seen["v"].keys() == saved_v.keys()
            assert all(torch.equal(seen["v"][name], v) for name, v in saved_v.items())
        else:
            assert "v of 0/4 VeLoRA layers" in summary[0]
    elif source == "velora":
        assert "left the optimizer state, the step count, v of 4 layers" in summary[0]


def test_lora_merge_is_w_plus_scaled_b_a(sources):
    """The LoRA merge written out: W = W0 + (alpha / r) · B · A (alpha 16, r 4), against the saved factors."""
    from velora.training.init_from import read_init_source

    folder, model = sources["lora"]
    init = read_init_source(folder)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    assert b.abs().sum() > 0  # trained: the merge is not trivially W0
    expected = layer.base_layer.weight + (16.0 / 4) * (b @ a)  # (out, in)
    torch.testing.assert_close(init.base["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-7)


def test_velora_v_goes_to_lora_velora_lora_a(sources, text_file):
    folder, source_model = sources["velora"]
    messages, seen = [], {}

    def inspect(model):
        seen.update({name.removeprefix("base_model.model.").replace(".lora_A.default", ""): layer.velora_v.clone()
                     for name, layer in velora_modules(model).items()})

    train(tiny(text_file, method="lora+velora", init_from=str(folder / "checkpoints" / "step-0000002")), None,
          measure=False, tensorboard=False, log=messages.append, on_model_ready=inspect)
    saved = {name: layer.velora_v for name, layer in velora_modules(source_model).items()}
    assert seen.keys() == saved.keys() and all(torch.equal(seen[name], v) for name, v in saved.items())
    assert any("v of 4/4 VeLoRA layers" in m for m in messages)


def test_init_from_errors_are_one_line(sources, text_file, tmp_path):
    folder, _ = sources["full"]
    with pytest.raises(ValueError, match="does not exist"):
        train(tiny(text_file, init_from=str(tmp_path / "nowhere")), None, measure=False, tensorboard=False)
    with pytest.raises(ValueError, match=r"has shape .* in this model; use the --model the source run trained"):
        train(tiny(text_file, model="llama-small", init_from=str(folder)), None, measure=False, tensorboard=False)


@pytest.mark.parametrize("source", ["dora", "flora"])
def test_other_trained_methods_as_sources(tmp_path, text_file, source):
    """DoRA is merged as peft merges it (m · V / ||V||_row); FLoRA (like GaLore) trains plain weights."""
    options = {"lora_rank": 4, "optimizer": "adamw"} if source == "flora" else {"lora_rank": 4}
    trained = train(tiny(text_file, method=source, options=options), tmp_path / source, measure=False,
                    tensorboard=False, log=lambda message: None)["_model"]
    expected = (copy.deepcopy(trained).merge_and_unload() if source == "dora" else trained).state_dict()
    seen, messages = {}, []
    train(tiny(text_file, method="full", init_from=str(tmp_path / source)), None, measure=False, tensorboard=False,
          log=messages.append, on_model_ready=lambda model: seen.update(copy.deepcopy(model.state_dict())))
    assert seen.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(seen[key], value, rtol=0, atol=1e-6, msg=key)
    assert any(m.startswith(f"--init-from {tmp_path / source} ({source} run, step 2)") for m in messages)


def test_a_quantised_source_is_refused_in_one_line(tmp_path, text_file):
    from safetensors.torch import save_file

    from velora.training.init_from import read_init_source

    checkpoint = tmp_path / "checkpoints" / "step-0000001"
    checkpoint.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text(checkpoint.name)
    save_file({"model.layers.0.mlp.down_proj.base_layer.weight": torch.zeros(8, 1, dtype=torch.uint8),
               "model.layers.0.mlp.down_proj.base_layer.weight.absmax": torch.ones(1)},
              str(checkpoint / "model.safetensors"))
    with pytest.raises(ValueError, match=r"holds 4-bit quantised weights \(a qlora run\)"):
        read_init_source(tmp_path)


def test_gpt2_conv1d_lora_is_merged_in_its_transposed_layout(tmp_path, text_file):
    """GPT-2 stores Conv1D weights as (in, out) and peft adapts them with fan_in_fan_out: the merge must match."""
    import transformers

    config_file = tmp_path / "gpt2-tiny.json"
    transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=256).to_json_file(config_file)
    source = train(tiny(text_file, model=str(config_file), method="lora"), tmp_path / "lora", measure=False,
                   tensorboard=False, log=lambda message: None)["_model"]
    expected = copy.deepcopy(source).merge_and_unload().state_dict()
    seen = {}
    train(tiny(text_file, model=str(config_file), method="full", init_from=str(tmp_path / "lora")), None,
          measure=False, tensorboard=False, log=lambda message: None,
          on_model_ready=lambda model: seen.update(copy.deepcopy(model.state_dict())))
    assert seen.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(seen[key], value, rtol=0, atol=1e-6, msg=key)


def test_init_from_refuses_a_tokenizer_that_maps_ids_differently_and_the_cli_takes_the_runs_own(tmp_path, text_file):
    """A source's embeddings are indexed by its tokenizer: a BPE retrained on other --data would silently scramble
    them, so it is refused; without --tokenizer the CLI uses the source run's tokenizer.json."""
    import json

    from velora.cli import main
    from velora.training.tokenizer import load_tokenizer

    source = tmp_path / "base"
    train(tiny(text_file, method="full", tokenizer="bpe", vocab_size=300), source, measure=False, tensorboard=False,
          log=lambda message: None)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"entirely different words number {i} " * 3 for i in range(400)))
    with pytest.raises(ValueError, match=r"--init-from .*base.*maps ids to other strings; pass --tokenizer"):
        train(tiny(other, method="lora", tokenizer="bpe", vocab_size=300, init_from=str(source)), None,
              measure=False, tensorboard=False, log=lambda message: None)
    out = tmp_path / "ft"
    code = main(["train", "--method", "lora", "--model", "llama-tiny", "--data", str(other), "--init-from",
                 str(source), "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300",
                 "--out", str(out), "--no-progress", "--no-memory"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["tokenizer"] == str(source / "tokenizer.json")
    saved = load_tokenizer(str(source / "tokenizer.json"))
    assert load_tokenizer(str(out / "tokenizer.json")).identity() == saved.identity()
