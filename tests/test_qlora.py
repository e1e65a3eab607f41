"""qlora / qlora+velora: bitsandbytes NF4 base + peft's bnb LoRA layers (+ velora-torch on lora_A), trained on
the CPU (bitsandbytes >= 0.50 runs NF4 there): loss falls, VeLoRA keeps fewer saved bytes, resume is bitwise,
remove_velora + merge_and_unload gives the same outputs, pretrained folders work, the planner's NF4 emulation holds
the real layer's bytes, and a missing bitsandbytes is a one-line error."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import lora_helpers  # noqa: E402

from velora.core.layers import remove_velora, velora_modules  # noqa: E402
from velora.core.lora_fused import Fused4bitLoRAMixin  # noqa: E402
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
    assert isinstance(layer, Fused4bitLoRAMixin)  # one fused autograd node per layer (velora.core.lora_fused)
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


def test_an_evaluation_does_not_change_the_4bit_base_training_continues_from(text_file):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place on its first eval-mode no-grad
    forward (block scales rounded to bf16, double quantisation dropped): a run that evaluated every 2 steps trained
    on another base than one that did not (step-3 loss 5.1350083 against 5.1350074 on such a CPU). Both layers
    velora-torch quantises and the bases of LoRA layers it wraps keep the training layout; remove_velora gives a
    wrapped base its own setting back."""
    evaluated = train(tiny(text_file, method="qlora+velora", eval_every=2), measure=False)
    plain = train(tiny(text_file, method="qlora+velora", eval_every=0), measure=False)
    assert evaluated["loss_curve"] == plain["loss_curve"]  # bitwise
    model = evaluated["_model"]
    bases = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert bases and all(m.support_avx512bf16_for_cpu is False for m in bases)
    assert all(m.weight.quant_state.nested for m in bases)  # still double-quantised after the evaluations

    layers = qlora_layers()
    originals = [m.base_layer.support_avx512bf16_for_cpu for m in peft_4bit_layers(layers)]
    for fuse_lora in (True, False):
        with_velora(layers, fuse_lora=fuse_lora)
        assert all(m.base_layer.support_avx512bf16_for_cpu is False for m in peft_4bit_layers(layers))
        remove_velora(layers)
        assert [m.base_layer.support_avx512bf16_for_cpu for m in peft_4bit_layers(layers)] == originals


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


# ---- the fused LoRA node on a 4-bit base (velora.core.lora_fused) -------------------------------------------

D, O, R, M = 64, 48, 4, 16  # in features, out features, LoRA rank, sub-token size


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, O)
        self.down = nn.Linear(O, D, bias=False)
        self.head = nn.Linear(D, 2)  # left in full precision and never adapted: a modules_to_save candidate

    def forward(self, x):
        return self.head(self.down(torch.tanh(self.up(x))))


def quantised_layers(dtype=torch.float32, quant_type="nf4", seed=0) -> nn.Module:
    """TwoLayers with both projections bnb 4-bit (double quantisation, ``dtype`` = the compute dtype)."""
    torch.manual_seed(seed)
    model = TwoLayers().to(dtype)
    for name in ("up", "down"):
        linear = getattr(model, name)
        layer = bnb.nn.Linear4bit(D if name == "up" else O, O if name == "up" else D, bias=linear.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type=quant_type)
        layer.load_state_dict(linear.state_dict())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)  # as quantize_base_linears
        setattr(model, name, layer.to("cpu"))  # Params4bit quantises when moved to a device
    model.is_loaded_in_4bit = True
    return model


def qlora_layers(dtype=torch.float32, adapter_dtype=None, quant_type="nf4", seed=0, **lora_kwargs) -> nn.Module:
    """peft's bnb LoRA on ``quantised_layers``, adapters in ``adapter_dtype`` (peft's default keeps them fp32)."""
    from peft import LoraConfig, get_peft_model

    model = quantised_layers(dtype, quant_type, seed)
    config = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["up", "down"], init_lora_weights=False,
                        lora_dropout=lora_kwargs.pop("lora_dropout", 0.0), **lora_kwargs)
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(adapter_dtype or dtype)
    return model


with_velora = functools.partial(lora_helpers.with_velora, default_sub_token_size=M)


def peft_4bit_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    return [m for m in model.modules() if isinstance(m, PeftLinear4bit)]


step = lora_helpers.forward_backward


def fused_4bit_ran(model: nn.Module, x: torch.Tensor) -> bool:
    """True if the first 4-bit LoRA layer's output came out of the fused Function."""
    return lora_helpers.fused_ran(peft_4bit_layers(model)[0], model, x)


def tokens(dtype=torch.float32, seed=1) -> torch.Tensor:
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (B, N, D)


def assert_steps_close(fused, unfused, tolerance):
    (out_f, gx_f, grads_f), (out_u, gx_u, grads_u) = fused, unfused
    assert out_f.dtype == out_u.dtype and gx_f.dtype == gx_u.dtype
    torch.testing.assert_close(out_f, out_u, **tolerance)
    torch.testing.assert_close(gx_f, gx_u, **tolerance)
    assert grads_f.keys() == grads_u.keys() and any("lora_A" in name for name in grads_f)
    for name in grads_u:
        assert grads_f[name].dtype == grads_u[name].dtype, name
        torch.testing.assert_close(grads_f[name], grads_u[name], **tolerance)


@pytest.mark.parametrize("dtype,adapter_dtype,quant_type,tolerance", [
    (torch.float32, None, "nf4", dict(rtol=1e-5, atol=1e-6)),
    (torch.float32, None, "fp4", dict(rtol=1e-5, atol=1e-6)),
    (torch.bfloat16, torch.float32, "nf4", dict(rtol=1e-2, atol=1e-2)),  # peft's default on a bf16 QLoRA base
    (torch.bfloat16, None, "nf4", dict(rtol=2e-2, atol=2e-2)),
], ids=["fp32-nf4", "fp32-fp4", "bf16-base-fp32-adapter", "bf16"])
def test_fused_4bit_equals_peft_bnb_path(dtype, adapter_dtype, quant_type, tolerance):
    from velora.core.lora_fused import Fused4bitLoRAMixin

    x = tokens(dtype)
    fused = with_velora(qlora_layers(dtype, adapter_dtype, quant_type))
    unfused = with_velora(qlora_layers(dtype, adapter_dtype, quant_type), fuse_lora=False)
    assert len(peft_4bit_layers(fused)) == 2
    assert all(isinstance(m, Fused4bitLoRAMixin) for m in peft_4bit_layers(fused))
    assert not any(isinstance(m, Fused4bitLoRAMixin) for m in peft_4bit_layers(unfused))
    assert fused_4bit_ran(fused, x) and not fused_4bit_ran(unfused, x)
    for _ in range(2):  # the first call builds v from the batch, the second reuses it
        assert_steps_close(step(fused, x), step(unfused, x), tolerance)
    for a, b in zip(fused.buffers(), unfused.buffers()):
        torch.testing.assert_close(a, b, **tolerance)  # v built the same way on both paths


def test_fused_4bit_equals_plain_autograd_on_the_dequantized_weight_when_subtokens_lie_on_v():
    # an independent reference: plain nn.Linear layers holding the dequantized 4-bit weights + plain peft LoRA,
    # no VeLoRA. With every sub-token of the LoRA input a multiple of one vector, VeLoRA is exact, so the fused
    # 4-bit node must give that model's output and all its gradients (only `up` stays, so its input is x)
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig, get_peft_model

    u = torch.linspace(-1.5, 2.0, M)  # (M,)
    coeffs = torch.randn(6, D // M, generator=torch.Generator().manual_seed(3))  # (T, G)
    x = (coeffs.unsqueeze(-1) * u).reshape(6, D)  # (T, D), sub-tokens on span(u)

    quantised = qlora_layers(torch.float32)
    base = quantised.base_model.model
    base.down, base.head = nn.Identity(), nn.Identity()
    plain_up = nn.Linear(D, O)
    with torch.no_grad():
        plain_up.weight.copy_(dequantize_4bit(base.up.base_layer.weight, base.up.base_layer.weight.quant_state))
        plain_up.bias.copy_(base.up.base_layer.bias)
    plain = get_peft_model(nn.Sequential(plain_up, nn.Tanh()), LoraConfig(r=R, lora_alpha=2 * R, target_modules=["0"]))
    with torch.no_grad():
        plain.base_model.model[0].lora_A["default"].weight.copy_(base.up.lora_A["default"].weight)
        plain.base_model.model[0].lora_B["default"].weight.copy_(base.up.lora_B["default"].weight)
    fused = with_velora(quantised, target_modules=["up"])
    assert fused_4bit_ran(fused, x)
    out_f, gx_f, grads_f = step(fused, x)
    out_p, gx_p, grads_p = step(plain, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-5, atol=1e-5)
    for part in ("lora_A", "lora_B"):
        grad_f = next(g for name, g in grads_f.items() if part in name)
        grad_p = next(g for name, g in grads_p.items() if part in name)
        torch.testing.assert_close(grad_f, grad_p, rtol=1e-5, atol=1e-5)


def test_fused_4bit_trains_the_base_bias_when_peft_unfreezes_it():
    x = tokens()
    fused, unfused = with_velora(qlora_layers(bias="all")), with_velora(qlora_layers(bias="all"), fuse_lora=False)
    assert fused_4bit_ran(fused, x)
    grads_f, grads_u = step(fused, x)[2], step(unfused, x)[2]
    assert any(name.endswith("up.base_layer.bias") for name in grads_f) and grads_f.keys() == grads_u.keys()
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-5, atol=1e-6)


def test_fused_4bit_saves_no_more_than_peft_bnb_path_and_no_dequantized_weight():
    from references import saved_activation_bytes

    from velora.memory import SavedActivationMeter

    x = tokens().requires_grad_(True)
    fused, unfused = with_velora(qlora_layers()), with_velora(qlora_layers(), fuse_lora=False)
    plain_qlora = qlora_layers()
    fused_bytes = saved_activation_bytes(fused, lambda: fused(x).sum())
    assert fused_bytes <= saved_activation_bytes(unfused, lambda: unfused(x).sum())
    assert fused_bytes < saved_activation_bytes(plain_qlora, lambda: plain_qlora(x).sum())
    with SavedActivationMeter(fused) as meter:
        out = fused(x)
    assert meter.total_bytes == fused_bytes and out.requires_grad
    # what the fused node keeps: z (T, D/M, 1), h (T, r), the adapters, v and the packed 4-bit weight (a parameter,
    # by reference); a dequantized (O, D) weight would be the only saved float tensor of O·D elements
    up = peft_4bit_layers(fused)[0]
    saved = [t for t in up(x).grad_fn.saved_tensors if t is not None]
    assert any(t is up.base_layer.weight for t in saved)
    floats = sorted(tuple(t.shape) for t in saved if t.is_floating_point())
    assert floats == sorted([(15, D // M, 1), (15, R), (R, D), (O, R), (M, 1)]), floats


def assert_steps_equal(a, b):
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = a, b
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[name], grads_b[name]) for name in grads_a)


def seeded_step(model: nn.Module, x: torch.Tensor):
    torch.manual_seed(7)  # same dropout masks on both models
    return step(model, x)


@pytest.mark.parametrize("case", ["eval", "dropout", "two-adapters", "disabled", "merged", "compute-dtype",
                                  "hooked-base"])
def test_fused_4bit_falls_back_to_peft_with_todays_numbers(case):
    from peft import LoraConfig

    x = tokens()

    def build(fuse_lora: bool) -> nn.Module:
        model = qlora_layers(lora_dropout=0.1 if case == "dropout" else 0.0,
                             dtype=torch.bfloat16 if case == "compute-dtype" else torch.float32)
        if case == "two-adapters":
            model.add_adapter("second", LoraConfig(r=R, target_modules=["up", "down"], init_lora_weights=False))
            model.base_model.set_adapter(["default", "second"])
        if case == "compute-dtype":  # fp32 x into a bf16-compute base: bitsandbytes casts, peft's path runs
            for name, param in model.named_parameters():
                if "lora_" in name or "head" in name:
                    param.data = param.data.float()
        if case == "dropout":
            with pytest.warns(UserWarning, match="lora_dropout=0.1"):
                return with_velora(model, fuse_lora=fuse_lora)
        return with_velora(model, fuse_lora=fuse_lora)

    fused, unfused = build(True), build(False)
    if case == "eval":
        fused.eval(), unfused.eval()
    if case == "disabled":
        fused.base_model.disable_adapter_layers(), unfused.base_model.disable_adapter_layers()
    if case == "merged":
        with pytest.warns(UserWarning, match="rounding errors"):  # peft re-quantises W + s·BA to 4 bits
            fused.base_model.merge_adapter(), unfused.base_model.merge_adapter()
    hooks = [peft_4bit_layers(m)[0].base_layer.register_forward_hook(lambda *args: None)
             for m in (fused, unfused)] if case == "hooked-base" else []
    for model in (fused, unfused):  # the first training batch builds v (through the dropout mask): same seed
        torch.manual_seed(3)
        assert not fused_4bit_ran(model, x)
    for _ in range(2):
        assert_steps_equal(seeded_step(fused, x), seeded_step(unfused, x))
    if hooks:
        for hook in hooks:
            hook.remove()
        assert fused_4bit_ran(fused, x)  # the hook was the only reason


def test_fused_4bit_with_modules_to_save_fuses_the_lora_layers_and_trains_the_saved_head():
    from peft import LoraConfig, get_peft_model

    from velora.core.lora_fused import FusedLoRAMixin

    def build(fuse_lora: bool) -> nn.Module:
        model = quantised_layers()
        config = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["up", "down"], modules_to_save=["head"],
                            init_lora_weights=False)
        return with_velora(get_peft_model(model, config), fuse_lora=fuse_lora)

    x = tokens()
    fused, unfused = build(True), build(False)
    assert fused_4bit_ran(fused, x)
    head = fused.base_model.model.head
    assert type(head).__name__ == "ModulesToSaveWrapper" and not isinstance(head, FusedLoRAMixin)
    a, b = step(fused, x), step(unfused, x)
    assert any("modules_to_save" in name for name in a[2])
    assert_steps_close(a, b, dict(rtol=1e-5, atol=1e-6))


def test_fused_4bit_layer_copies_pickles_and_remove_velora_restores_peft_class_and_keys():
    import copy
    import pickle

    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from velora.core.lora_fused import Fused4bitLoRAMixin

    model = qlora_layers()
    keys = list(model.state_dict())
    fused = with_velora(model)
    assert [k for k in fused.state_dict() if "velora" not in k] == keys
    x = tokens()
    clone = copy.deepcopy(fused)
    assert all(isinstance(m, Fused4bitLoRAMixin) for m in peft_4bit_layers(clone)) and fused_4bit_ran(clone, x)
    restored = pickle.loads(pickle.dumps(peft_4bit_layers(fused)[0]))
    assert isinstance(restored, Fused4bitLoRAMixin)
    remove_velora(fused)
    assert all(type(m) is PeftLinear4bit for m in peft_4bit_layers(fused))
    assert list(fused.state_dict()) == keys
