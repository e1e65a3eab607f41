"""SavedActivationMeter: exact byte counts on hand-countable models, dedup, checkpointing, VeLoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from velora import VeLoRAConfig, apply_velora
from velora.memory import SavedActivationMeter

FP32 = 4




def test_two_layer_mlp_saves_exactly_input_and_relu_output():
    torch.manual_seed(0)
    batch, d_in, hidden, d_out = 5, 16, 32, 8
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    x = torch.randn(batch, d_in)
    with SavedActivationMeter(mlp) as meter:
        loss = mlp(x).sum()
    # Linear 0 keeps x for its weight grad; ReLU keeps its output, which Linear 2 keeps too (same storage);
    # the weights arrive as .t() views of parameters and are not activations.
    assert meter.total_bytes == FP32 * batch * (d_in + hidden)
    assert meter.by_module() == {"1": FP32 * batch * hidden, "0": FP32 * batch * d_in}
    loss.backward()  # the graph the meter watched is a normal graph
    assert mlp[0].weight.grad is not None
    assert "total (unique storages)" in meter.report()


class SharedInput(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.q(x) + self.k(x) + self.v(x.view(-1, x.shape[-1])).view_as(x)


def test_one_input_feeding_three_linears_counts_once():
    torch.manual_seed(0)
    block = SharedInput(16)
    x = torch.randn(3, 7, 16)
    with SavedActivationMeter(block) as meter:
        loss = block(x).sum()
    assert meter.total_bytes == x.numel() * FP32  # three saves, one of them through a view: one storage
    assert meter.by_module() == {"q": x.numel() * FP32}  # charged to the first module that saved it
    del loss


def test_without_model_hooks_every_module_and_excludes_their_parameters():
    block = SharedInput(16)
    x = torch.randn(4, 16)
    with SavedActivationMeter() as meter:
        loss = block(x).sum()
    assert meter.total_bytes == x.numel() * FP32
    assert meter.by_module() == {"Linear": x.numel() * FP32}
    del loss


class ScaleByParameter(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("shift", torch.zeros(dim))

    def forward(self, x):
        return (x * self.weight) * (self.shift + 1)


def test_parameters_and_buffers_excluded_by_storage():
    module = ScaleByParameter(8)
    x = torch.randn(2, 8, requires_grad=True)
    with SavedActivationMeter(module) as meter:
        loss = module(x).sum()
    # first mul saves x (weight grad) and the weight (x grad: excluded); the second saves only shift+1,
    # a new tensor, since the buffer side needs no grad
    expected = FP32 * (x.numel() + 8)
    assert meter.total_bytes == expected
    del loss


def test_saved_tensor_that_dies_inside_the_block_is_not_counted():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    kept = torch.randn(4, 8)
    with SavedActivationMeter(mlp) as meter:
        mlp(torch.randn(64, 8)).sum()  # graph dropped at once: nothing of it is kept for a backward
        loss = mlp(kept).sum()
    assert meter.total_bytes == FP32 * (kept.numel() + kept.numel())  # input + tanh output
    del loss


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_region_counts_only_what_it_keeps(use_reentrant):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(6, 16, requires_grad=True)
    with SavedActivationMeter(mlp) as plain:
        plain_loss = mlp(x).sum()
    with SavedActivationMeter(mlp) as meter:
        loss = checkpoint(mlp, x, use_reentrant=use_reentrant).sum()
    assert plain.total_bytes == FP32 * 6 * (16 + 64 + 64)  # x, GELU input, GELU output
    assert meter.total_bytes == FP32 * x.numel()  # the region keeps its input, recomputes the rest
    loss.backward()
    del plain_loss
    assert x.grad is not None


def _tiny_llama():
    from velora.training.models import build_config, build_model

    torch.manual_seed(0)
    return build_model(build_config("llama-tiny", vocab_size=256))


def _layer_bytes(meter: SavedActivationMeter, layer: int, name: str) -> int:
    return meter.by_module().get(f"model.layers.{layer}.{name}", 0)


def test_velora_shows_what_it_frees_and_what_it_cannot():
    model = _tiny_llama()
    config = model.config
    batch, seq = 2, 32
    tokens = batch * seq
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with SavedActivationMeter(model) as base:
        base_loss = model(input_ids=ids, labels=ids).loss
    sub_token = 32
    apply_velora(model, VeLoRAConfig(sub_token_size=sub_token, target_modules=["v_proj", "down_proj"]))
    with SavedActivationMeter(model) as meter:
        loss = model(input_ids=ids, labels=ids).loss
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    z_v = FP32 * tokens * hidden // sub_token  # (T, D/M, 1)
    z_down = FP32 * tokens * inter // sub_token
    for layer in range(layers):
        # v_proj's input is still kept by q_proj (first to save it): compressing v_proj only adds z
        assert _layer_bytes(meter, layer, "self_attn.v_proj") == z_v
        assert _layer_bytes(base, layer, "self_attn.v_proj") == 0
        assert _layer_bytes(meter, layer, "self_attn.q_proj") == _layer_bytes(base, layer, "self_attn.q_proj")
        # down_proj's input (gate·up product) was kept by down_proj alone: it is replaced by z
        assert _layer_bytes(base, layer, "mlp.down_proj") == FP32 * tokens * inter
        assert _layer_bytes(meter, layer, "mlp.down_proj") == z_down
    expected_change = layers * (z_v + z_down - FP32 * tokens * inter)
    assert meter.total_bytes - base.total_bytes == expected_change
    loss.backward()
    del base_loss


def test_meter_errors_are_one_line():
    with pytest.raises(ValueError, match="nn.Module"):
        SavedActivationMeter(model="not a module")
    meter = SavedActivationMeter()
    with pytest.raises(ValueError, match="after the"):
        meter.total_bytes  # noqa: B018
    with meter, pytest.raises(ValueError, match="already active"):
        meter.__enter__()


def test_peft_fp32_adapters_on_a_bf16_base_keep_one_fp32_copy_per_adapted_layer():
    from velora.memory import training_setup
    from velora.memory.planner import load_config

    batch, seq = 2, 16
    setup = training_setup(load_config("llama-tiny"), "lora", batch=batch, seq=seq, dtype="bf16")
    ids = torch.randint(0, 512, (batch, seq))
    with SavedActivationMeter(setup.model) as meter:
        loss = setup.model(input_ids=ids, labels=ids).loss
    hidden = setup.model.config.hidden_size
    attention = "base_model.model.model.layers.0.self_attn"
    for name in ("q_proj", "k_proj", "v_proj"):
        # peft casts the shared bf16 input to its fp32 adapter dtype once per layer: three fp32 copies
        assert meter.by_module()[f"{attention}.{name}.lora_A.default"] == FP32 * batch * seq * hidden
    loss.backward()
