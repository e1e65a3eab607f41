"""VeLoRA in real training set-ups: bf16 autocast on CPU, torch.compile, gradient accumulation, frozen weights,
eval / no_grad, and GPT-2's Conv1D (transformers)."""

from __future__ import annotations

import copy

import pytest
import torch
from references import capture_io, saved_activation_bytes
from torch import nn

from velora import VeLoRAConfig, apply_velora, velora_modules
from velora.core.subtoken import compress, reconstruct

torch.set_num_threads(1)


class MLP(nn.Module):
    """Two linears with a non-linearity between: the second one's input is kept only by the second linear."""

    def __init__(self, width: int = 64, hidden: int = 128):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


# ---- autocast ----------------------------------------------------------------------------------------------


def test_bf16_autocast_matches_autocast_forward_and_keeps_fp32_grads():
    plain = mlp()
    model = apply_velora(copy.deepcopy(plain), VeLoRAConfig(sub_token_size=16, target_modules=["up", "down"]))
    x = torch.randn(4, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(x)
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)  # the forward is autocast's bf16 linear, bit for bit

    inputs, grads, handles = capture_io(velora_modules(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    for handle in handles:
        handle.remove()
    for name, module in velora_modules(model).items():
        assert module.weight.dtype == torch.float32 and module.weight.grad.dtype == torch.float32
        assert module.velora_v.dtype == torch.float32  # statistics in fp32, not in bf16
        x_in = inputs[name].reshape(-1, module.in_features)  # (T, D) in bf16
        grad_out = grads[name].reshape(-1, module.out_features).float()  # (T, O)
        x_hat = reconstruct(compress(x_in, module.velora_v), module.velora_v, module.in_features)  # (T, D) bf16
        reference = grad_out.t() @ x_hat.float()  # (O, D)
        torch.testing.assert_close(module.weight.grad, reference, rtol=2e-2, atol=1e-4)
        torch.testing.assert_close(module.bias.grad, grad_out.sum(0), rtol=2e-2, atol=1e-4)


# ---- torch.compile -----------------------------------------------------------------------------------------


@pytest.mark.slow  # inductor's first compile takes ~15 s of CPU
def test_torch_compile_gives_the_eager_gradients():
    eager = apply_velora(mlp(), VeLoRAConfig(sub_token_size=16, target_modules=["up", "down"]))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="inductor")

    # step 1 initialises v inside the compiled call (a data-dependent graph break); step 2 runs the traced graph
    for _ in range(2):
        x, target = torch.randn(4, 8, 64), torch.randn(4, 8, 64)
        for module, run in ((eager, eager), (compiled_model, compiled)):
            module.zero_grad(set_to_none=True)
            (run(x) - target).square().mean().backward()
        for (name, p_eager), (_, p_compiled) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(compiled_model.down.velora_v, eager.down.velora_v)  # inductor rounds differently
    # the compiled model still uses the factored gradient, not the exact one
    exact = mlp()
    (exact(x) - target).square().mean().backward()
    assert not torch.allclose(exact.down.weight.grad, compiled_model.down.weight.grad, rtol=1e-3, atol=1e-5)


# ---- gradient accumulation ---------------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_large_batch():
    model = apply_velora(mlp(), VeLoRAConfig(sub_token_size=16, target_modules=["up", "down"]))
    batch, target = torch.randn(8, 8, 64), torch.randn(8, 8, 64)
    model(batch[:4])  # v from the first micro-batch (batch_average_once: fixed afterwards)
    v_before = {name: m.velora_v.clone() for name, m in velora_modules(model).items()}
    large = copy.deepcopy(model)

    for micro in (slice(0, 4), slice(4, 8)):  # two micro-batches, gradients summed by autograd
        (model(batch[micro]) - target[micro]).square().sum().backward()
    (large(batch) - target).square().sum().backward()
    for (name, p_acc), (_, p_large) in zip(model.named_parameters(), large.named_parameters()):
        torch.testing.assert_close(p_acc.grad, p_large.grad, rtol=1e-5, atol=1e-5, msg=name)
    for name, module in velora_modules(model).items():
        assert torch.equal(module.velora_v, v_before[name])  # micro-batches do not re-initialise v


# ---- frozen weights, eval, no_grad -------------------------------------------------------------------------


def test_frozen_weight_runs_the_plain_layer():
    plain = mlp()
    model = apply_velora(copy.deepcopy(plain), VeLoRAConfig(sub_token_size=16, target_modules=["up", "down"]))
    for m in (plain, model):
        m.down.weight.requires_grad_(False)
    x = torch.randn(4, 8, 64, requires_grad=True)
    plain_bytes = saved_activation_bytes(plain, lambda: plain(x).square().sum())
    velora_bytes = saved_activation_bytes(model, lambda: model(x).square().sum())
    # 'down' is frozen: nothing of its input is needed for a weight gradient, so it keeps no z either;
    # 'up' still trains and keeps z (T, 64/16) instead of x (T, 64)
    tokens = x.shape[0] * x.shape[1]
    assert plain_bytes - velora_bytes == tokens * 4 * (64 - 64 // 16)
    assert not bool(model.down.velora_initialised)

    for m in (plain, model):
        m.zero_grad(set_to_none=True)
    x.grad = None
    plain(x).square().sum().backward()
    grad_plain = x.grad.clone()
    x.grad = None
    model(x).square().sum().backward()
    # the input gradient is exact in VeLoRA (only weight gradients are approximated)
    torch.testing.assert_close(x.grad, grad_plain, rtol=1e-5, atol=1e-6)
    assert model.down.weight.grad is None


@pytest.mark.parametrize("context", ["eval", "no_grad", "inference_mode"])
def test_eval_and_no_grad_run_the_plain_layer(context):
    plain = mlp()
    model = apply_velora(copy.deepcopy(plain), VeLoRAConfig(sub_token_size=16, target_modules=["up", "down"]))
    x = torch.randn(4, 8, 64)
    if context == "eval":
        model.eval()
        plain.eval()
        out, expected = model(x), plain(x)
        assert out.grad_fn is not None and "VeLoRA" not in type(out.grad_fn).__name__
        assert "VeLoRA" not in type(out.grad_fn.next_functions[0][0]).__name__
    else:
        manager = torch.no_grad if context == "no_grad" else torch.inference_mode
        with manager():
            out, expected = model(x), plain(x)
    assert torch.equal(out, expected)
    assert not any(bool(m.velora_initialised) for m in velora_modules(model).values())  # v untouched


# ---- GPT-2 Conv1D ------------------------------------------------------------------------------------------


def gpt2_tiny(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    model.train()
    return model


def test_gpt2_conv1d_factored_grads_and_saved_bytes():
    from transformers.pytorch_utils import Conv1D

    plain = gpt2_tiny()
    model = apply_velora(gpt2_tiny(), VeLoRAConfig(sub_token_size=16))  # 'paper' preset: mlp.c_proj for GPT-2
    wrapped = velora_modules(model)
    assert sorted(wrapped) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert all(isinstance(m, Conv1D) for m in wrapped.values())

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    inputs, grads, handles = capture_io(wrapped)
    model(input_ids=ids, labels=ids).loss.backward()
    for handle in handles:
        handle.remove()
    for name, module in wrapped.items():
        in_features = module.weight.shape[0]  # Conv1D stores (D, O)
        x_in = inputs[name].reshape(-1, in_features)  # (T, 4·64)
        grad_out = grads[name].reshape(-1, module.nf)  # (T, 64)
        x_hat = reconstruct(compress(x_in, module.velora_v), module.velora_v, in_features)  # (T, D)
        torch.testing.assert_close(module.weight.grad, x_hat.t() @ grad_out, rtol=1e-5, atol=1e-6)  # (D, O)

    model.zero_grad(set_to_none=True)
    plain_bytes = saved_activation_bytes(plain, lambda: plain(input_ids=ids, labels=ids).loss)
    velora_bytes = saved_activation_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    # each c_proj input (the GELU output, T × 256, kept by nobody else) becomes z (T × 256/16)
    tokens, width, layers = ids.numel(), 4 * 64, 2
    assert plain_bytes - velora_bytes == layers * tokens * 4 * (width - width // 16)
