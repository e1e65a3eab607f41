"""qlora / qlora+velora: bitsandbytes NF4 base + peft's bnb LoRA layers (+ velora-torch on lora_A), trained on
the CPU (bitsandbytes >= 0.50 runs NF4 there): loss falls, VeLoRA keeps fewer saved bytes, resume is bitwise,
remove_velora + merge_and_unload gives the same outputs, pretrained folders work, the planner's NF4 emulation holds
the real layer's bytes, and a missing bitsandbytes is a one-line error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from velora.core.layers import remove_velora, velora_modules  # noqa: E402
from velora.memory.nf4 import NF4Linear  # noqa: E402
from velora.methods.lora.qlora import linear4bit_bytes, quantize_base_linears  # noqa: E402
from velora.training.loop import TrainConfig, latest_checkpoint, train  # noqa: E402


def tiny(text_file: Path, **changes) -> TrainConfig:
    settings = dict(model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32, batch_size=4, steps=6,
                    lr=1e-2, warmup_steps=1, eval_batches=2, velora={"sub_token_size": 16, "target_modules": "paper"})
    settings.update(changes)
    return TrainConfig(**settings)


def _cli_json(capsys, *args: str) -> dict:
    from velora.cli import main

    assert main(["train", "--no-progress", "--json", "--threads", "1", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_qlora_and_qlora_velora_train_through_the_cli_loss_falls_and_velora_saves(tmp_path, capsys, text_file):
    common = ["--data", str(text_file), "--tokenizer", "byte", "--model", "llama-tiny", "--steps", "25",
              "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2", "--eval-batches", "2", "--sub-token-size",
              "16"]
    results = {}
    for method in ("qlora", "qlora+velora"):
        results[method] = _cli_json(capsys, "--method", method, "--out", str(tmp_path / method), *common)
        result = results[method]
        assert result["method"] == method and result["device"] == "cpu"
        losses = [loss for _, loss in result["loss_curve"]]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, (method, losses)  # byte-level: starts at ~5.55
    # VeLoRA compresses lora_A's input of v_proj and down_proj: fewer unique saved bytes (velora.memory's meter)
    assert 0 < results["qlora+velora"]["activation_bytes"] < results["qlora"]["activation_bytes"]
    # the frozen base is 4-bit: far fewer parameter bytes than the float32 model it came from
    assert results["qlora"]["trainable_parameters"] < results["qlora"]["parameters"] / 4


def test_base_linears_are_nf4_linear4bit_wrapped_by_peft_and_lora_a_carries_velora(text_file):
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    config = tiny(text_file, method="qlora+velora", steps=1, options={"qlora_compute_dtype": "bfloat16"})
    model = train(config, measure=False)["_model"]
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, PeftLinear4bit) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
    state = layer.base_layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantisation
    assert layer.base_layer.compute_dtype == torch.bfloat16
    assert not layer.base_layer.weight.requires_grad
    assert isinstance(model.base_model.model.lm_head, nn.Linear)  # the head stays in full precision
    wrapped = sorted(velora_modules(model))
    assert wrapped and all(name.endswith((".v_proj.lora_A.default", ".down_proj.lora_A.default"))
                           for name in wrapped)


def test_qlora_velora_resume_is_bitwise(tmp_path, text_file):
    config = tiny(text_file, method="qlora+velora")
    straight = train(config, tmp_path / "straight", measure=False)
    train(config, tmp_path / "split", measure=False, stop_at_step=3)
    assert latest_checkpoint(tmp_path / "split").name == "step-0000003"
    resumed = train(config, tmp_path / "split", resume=True, measure=False)
    a, b = straight["_model"].state_dict(), resumed["_model"].state_dict()
    assert a.keys() == b.keys() and any(".velora_v" in k for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]  # adapters, v, and the packed NF4 base
    assert not different, different[:5]
    assert resumed["loss_curve"] == straight["loss_curve"]


def test_quantised_model_reloads_strictly_and_bitwise_from_its_state_dict():
    from velora.training.models import build_config, build_model

    def quantised(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = build_model(build_config("llama-tiny"))
        quantize_base_linears(model)
        return model

    source, target = quantised(0), quantised(1)
    target.load_state_dict(source.state_dict(), strict=True)  # the statistics keys are consumed by the hook
    a, b = source.state_dict(), target.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 512, (2, 16))  # (B, T)
    assert torch.equal(source(input_ids=ids).logits, target(input_ids=ids).logits)


def test_remove_velora_then_merge_and_unload_gives_a_plain_model_with_the_same_outputs(text_file):
    model = train(tiny(text_file, method="qlora+velora", steps=8), measure=False)["_model"]
    model.eval()
    ids = torch.randint(0, 257, (2, 24))  # (B, T)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits  # (B, T, V)
        base_only_model = model.get_base_model()
        with model.disable_adapter():
            base_only = model(input_ids=ids).logits
    assert (adapted - base_only).abs().max() > 1e-2  # the adapters changed the outputs: merging must carry them
    remove_velora(model)
    merged = model.merge_and_unload()
    assert merged is base_only_model and not velora_modules(merged)
    assert not any("lora_" in name for name, _ in merged.named_modules())
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    # merging re-quantises W + BA to NF4: 4-bit error, far below the adapters' own effect on the outputs
    error = (out - adapted).abs().max()
    assert error < 0.25 * (adapted - base_only).abs().max(), float(error)
    assert torch.allclose(out.softmax(-1), adapted.softmax(-1), atol=2e-2)


def test_qlora_trains_from_a_pretrained_folder(tmp_path, text_file):
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_attention_heads=4,
                                      num_key_value_heads=4, num_hidden_layers=2, vocab_size=300,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "pretrained")
    result = train(tiny(text_file, method="qlora+velora", model=str(tmp_path / "pretrained"), steps=10),
                   measure=False)
    assert result["final_loss"] < result["initial_loss"]
    model = result["_model"]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14  # 7 per decoder layer


@pytest.mark.parametrize("in_features, out_features", [(64, 192), (1376, 512), (100, 30)])
def test_planner_nf4_emulation_holds_the_real_layer_bytes(in_features, out_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    emulated = NF4Linear(linear)
    emulated_bytes = sum(b.numel() * b.element_size() for b in emulated.buffers())
    container = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    container[0].weight.data.copy_(linear.weight)
    quantize_base_linears(container)
    real = linear4bit_bytes(container[0])
    assert emulated_bytes == real["weights"]  # packed codes + 8-bit absmax + fp32 double-quantisation scales
    assert real["tables"] == 4 * (16 + 256 + 1)  # code books the planner leaves out (documented in nf4.py)


def test_missing_bitsandbytes_is_a_one_line_error_saying_what_to_install(tmp_path, capsys, monkeypatch, text_file):
    from velora.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when not installed
    code = main(["train", "--method", "qlora", "--data", str(text_file), "--tokenizer", "byte", "--steps", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "bitsandbytes" in err and 'pip install -e ".[qlora]"' in err


def test_bad_compute_dtype_is_a_one_line_error(text_file):
    with pytest.raises(ValueError, match="qlora_compute_dtype='fp8' is unknown"):
        tiny(text_file, method="qlora", options={"qlora_compute_dtype": "fp8"}).method_options()
