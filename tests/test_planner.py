"""Planner: fake-tensor plans against real CPU steps, qlora emulation, CLI output and one-line errors.

The full validation (llama-60m and GPT-2 small, batch 2, seq 256) is `benchmarks/bench_plan.py validate`;
here the same comparison runs on tiny configs so the suite stays fast.
"""

from __future__ import annotations

import json

import pytest
import torch

from velora.cli import main
from velora.memory import measure_step_peak, plan, training_setup
from velora.memory.nf4 import NF4Linear, dequantize_nf4, nf4_bytes_per_weight, quantize_nf4
from velora.memory.planner import load_config
from velora.training.models import build_config

BATCH, SEQ = 2, 32


def _real(model: str, method: str, optimizer: str = "adamw", **options):
    setup = training_setup(load_config(model), method, optimizer, batch=BATCH, seq=SEQ, **options)
    return measure_step_peak(setup.model, setup.optimizer, setup.step, steps=2)


def _assert_close(planned: dict, real, tolerance: float = 0.03) -> None:
    assert abs(planned["peak_bytes"] / real.peak_bytes - 1) <= tolerance
    for name, real_bytes in real.breakdown.items():
        assert abs(planned["breakdown"][name] - real_bytes) <= tolerance * max(real_bytes, 1), name


@pytest.mark.parametrize(
    "method,optimizer",
    [("full", "adamw"), ("lora", "adamw"), ("velora", "adamw"), ("galore", "adamw"), ("flora", "adafactor"),
     ("gradnormlorp", "adamw"), ("lora+velora+ckpt", "adamw"), ("full", "adamw8bit")],
)
def test_plan_matches_real_cpu_step_on_tiny_llama(method, optimizer):
    planned = plan("llama-tiny", method, optimizer, batch=BATCH, seq=SEQ)
    _assert_close(planned, _real("llama-tiny", method, optimizer))
    assert planned["peak_bytes"] == sum(planned["breakdown"].values())


@pytest.mark.parametrize("bits", [8, 4])
def test_plan_counts_quantised_coefficients_as_codes_and_scales(bits):
    """M = 4: the paper's rank 1 in fp32 keeps D bytes per token and layer; rank 4 in ``bits`` bits keeps
    D·bits/8 + 4 (one fp32 scale per token) and 4·D per layer (one fp32 scale per coefficient column), on fake
    tensors and in a real CPU step alike."""
    layers = 2 * build_config("llama-tiny").num_hidden_layers  # v_proj and down_proj of every decoder layer
    paper = plan("llama-tiny", "velora", batch=BATCH, seq=SEQ, sub_token_size=4)["saved_activation_bytes"]
    options = dict(sub_token_size=4, velora_rank=4, velora_coefficient_bits=bits)
    planned = plan("llama-tiny", "velora", batch=BATCH, seq=SEQ, **options)
    widths = [m.in_features for n, m in training_setup(load_config("llama-tiny"), "velora", batch=BATCH, seq=SEQ,
                                                          sub_token_size=4).model.named_modules()
              if n.endswith(("v_proj", "down_proj"))]
    assert len(widths) == layers
    tokens = BATCH * SEQ
    expected = paper + sum(tokens * (d * bits // 8 + 4) + 4 * d - tokens * d for d in widths)  # swap each z
    assert planned["saved_activation_bytes"] == expected
    _assert_close(planned, _real("llama-tiny", "velora", **options))


def _tiny_config(family: str):
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64), SEQ
    if family == "roberta":
        return transformers.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, vocab_size=256, max_position_embeddings=66,
                                          type_vocab_size=1), SEQ
    return transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  image_size=32, patch_size=8), 17  # 16 patches + class token


@pytest.mark.parametrize("family", ["gpt2", "roberta", "vit"])
def test_plan_matches_real_cpu_step_on_other_families(family):
    config, seq = _tiny_config(family)
    planned = plan(config, "velora", batch=BATCH, seq=seq)
    setup = training_setup(config, "velora", batch=BATCH, seq=seq)
    _assert_close(planned, measure_step_peak(setup.model, setup.optimizer, setup.step))


def test_zero_gradient_warm_up_equals_a_traced_first_step():
    fast = plan("llama-tiny", "galore", batch=BATCH, seq=SEQ)
    traced = plan("llama-tiny", "galore", batch=BATCH, seq=SEQ, full_warmup=True)
    assert fast["peak_bytes"] == traced["peak_bytes"]
    assert fast["breakdown"] == traced["breakdown"]


def test_methods_order_as_their_papers_say_on_the_same_model():
    results = {m: plan("llama-tiny", m, batch=BATCH, seq=SEQ) for m in ("full", "velora", "lora", "full+ckpt")}
    act = {m: r["breakdown"]["activations"] for m, r in results.items()}
    assert act["velora"] < act["full"]  # compressed value/down-proj inputs
    assert act["full+ckpt"] < act["velora"]  # only decoder-layer inputs are kept
    state = {m: r["breakdown"]["optimizer_state"] for m, r in results.items()}
    assert state["lora"] < state["full"] == state["velora"]


def test_qlora_parameters_are_nf4_sized_and_match_a_real_emulated_step():
    planned = plan("llama-tiny", "qlora", batch=BATCH, seq=SEQ, dtype="bf16")
    config = build_config("llama-tiny")
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    quantised = layers * (4 * hidden * hidden + 3 * hidden * inter)  # q k v o, gate up down
    rank, targets = 8, layers * (4 * (hidden + hidden) + 2 * (hidden + inter) + (inter + hidden))
    def ceil(a: int, b: int) -> int:
        return -(-a // b)

    # two codes per byte, one 8-bit absmax per 64 weights, one fp32 scale per 256 absmax
    packed = layers * sum(ceil(n, 2) + ceil(n, 64) + 4 * ceil(ceil(n, 64), 256)
                          for n in [hidden * hidden] * 4 + [hidden * inter] * 3)
    plain = 2 * (2 * config.vocab_size * hidden + (2 * layers + 1) * hidden)  # embeddings, head, norms in bf16
    adapters = 4 * rank * targets  # peft keeps adapters in fp32
    rotary = 2 * 4 * (hidden // config.num_attention_heads // 2)  # inv_freq + original_inv_freq (fp32)
    assert planned["breakdown"]["parameters"] == packed + plain + adapters + rotary
    assert abs(packed / quantised - nf4_bytes_per_weight()) < 0.01
    assert planned["parameter_count"] == quantised + 2 * config.vocab_size * hidden + (2 * layers + 1) * hidden \
        + rank * targets
    _assert_close(planned, _real("llama-tiny", "qlora", dtype="bf16"))


def test_nf4_round_trip_and_gradient():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    packed, codes, scales = quantize_nf4(linear.weight)
    weight = dequantize_nf4(packed, codes, scales, linear.weight.shape, torch.float32)
    blocks = linear.weight.detach().reshape(-1, 64)
    # NF4 levels are at most 0.3 apart, absmax is 8-bit: error ≤ ~0.16·absmax per block
    error = (weight.reshape(-1, 64) - blocks).abs().amax(dim=1)
    assert bool((error <= 0.17 * blocks.abs().amax(dim=1)).all())
    layer = NF4Linear(linear)
    x = torch.randn(3, 128, requires_grad=True)
    reference = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    torch.nn.functional.linear(reference, weight, linear.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_plan_from_a_config_file_equals_the_preset(tmp_path):
    config = build_config("llama-tiny")
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    from_file = plan(str(path), "lora", batch=BATCH, seq=SEQ)
    from_preset = plan("llama-tiny", "lora", batch=BATCH, seq=SEQ)
    assert from_file["peak_bytes"] == from_preset["peak_bytes"]


def test_cli_json_and_table(capsys):
    assert main(["plan", "--model", "llama-tiny", "--method", "velora", "--batch", "2", "--seq", "32",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["peak_bytes"] == sum(result["breakdown"].values())
    assert set(result["breakdown"]) == {"parameters", "gradients", "optimizer_state", "activations", "temporaries"}
    assert result["peak_bytes"] == plan("llama-tiny", "velora", batch=2, seq=32)["peak_bytes"]
    assert main(["plan", "--model", "llama-tiny", "--method", "velora", "--batch", "2", "--seq", "32", "--json",
                 "--sub-token-size", "4", "--velora-rank", "4", "--velora-coefficient-bits", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["saved_activation_bytes"] == plan(
        "llama-tiny", "velora", batch=2, seq=32, sub_token_size=4, velora_rank=4,
        velora_coefficient_bits=8)["saved_activation_bytes"]
    assert main(["plan", "--model", "llama-tiny", "--method", "velora", "--batch", "2", "--seq", "32", "--json",
                 "--sub-token-size", "4", "--velora-rank", "4", "--velora-coefficient-bits", "8",
                 "--velora-coefficient-scales", "token"]) == 0
    widths = sum(m.in_features for n, m in training_setup(load_config("llama-tiny"), "velora", batch=2, seq=32,
                                                          sub_token_size=4).model.named_modules()
                 if n.endswith(("v_proj", "down_proj")))
    assert json.loads(capsys.readouterr().out)["saved_activation_bytes"] == plan(
        "llama-tiny", "velora", batch=2, seq=32, sub_token_size=4, velora_rank=4,
        velora_coefficient_bits=8)["saved_activation_bytes"] - 4 * widths  # no per-column scales
    assert main(["plan", "--model", "llama-tiny", "--method", "lora", "--batch", "2", "--seq", "32"]) == 0
    table = capsys.readouterr().out
    assert "MiB" in table and "peak" in table and "optimizer state" in table  # a tiny model's peak is in MiB


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama-99b"], "unknown model 'llama-99b'; choose a preset"),
        (["--model", "/nowhere/config.json"], "does not exist"),
        (["--model", "llama-tiny", "--seq", "0"], "seq=0 must be a positive integer"),
        (["--model", "llama-tiny", "--batch", "-1"], "batch=-1 must be a positive integer"),
        (["--model", "llama-tiny", "--method", "galore", "--optimizer", "adafactor"],
         "optimizer='adafactor' does not apply to method 'galore'"),
        (["--model", "llama-tiny", "--method", "lora+galore"], "pick one base"),
        (["--model", "llama-tiny", "--method", "sparse"], "unknown part"),
        (["--model", "gpt2", "--seq", "4096"], "exceeds the 1024 positions"),
        (["--model", "vit-base", "--seq", "100"], "use --seq 197"),
        (["--model", "llama-tiny", "--sub-token-size", "0"], "--sub-token-size=0 must be a positive integer"),
        (["--model", "llama-tiny", "--method", "velora", "--sub-token-size", "4", "--velora-rank", "8"],
         "rank=8 exceeds sub_token_size=4"),
        (["--model", "llama-tiny", "--method", "velora", "--velora-coefficient-scales", "token"],
         "coefficient_scales='token' applies only to quantised coefficients; set coefficient_bits=8 or 4"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1


def test_plan_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lora_rnak'\]"):
        plan("llama-tiny", "lora", batch=1, seq=8, lora_rnak=4)
