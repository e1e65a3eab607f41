"""The fused LoRA + VeLoRA path (velora.core.lora_fused): same numbers as peft's unfused path and as plain autograd,
the same saved bytes, and peft's own forward whenever the case is not the plain one."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
import lora_helpers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402
from references import saved_activation_bytes  # noqa: E402

from velora import VeLoRAConfig, remove_velora  # noqa: E402
from velora.core.lora_fused import FusedLoRAMixin  # noqa: E402

torch.set_num_threads(1)

D, O, R, M = 32, 24, 4, 8  # in features, out features, LoRA rank, sub-token size


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, O)
        self.down = nn.Linear(O, D, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def lora(dtype=torch.float64, seed=0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["up", "down"], init_lora_weights=False,
                        lora_dropout=kwargs.pop("lora_dropout", 0.0), **kwargs)
    return get_peft_model(TwoLayers(), config).to(dtype)


def with_velora(model: nn.Module, **overrides) -> nn.Module:
    return lora_helpers.with_velora(model, M, **overrides)


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, PeftLinear)]


run = lora_helpers.forward_backward


def fused_ran(model: nn.Module, x: torch.Tensor) -> bool:
    """True if the first LoRA layer's output came out of the fused Function."""
    return lora_helpers.fused_ran(layers(model)[0], model, x)


def batch(dtype=torch.float64, seed=1) -> torch.Tensor:
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)  # (B, N, D)


# ---- numerics --------------------------------------------------------------------------------------------


def test_fused_equals_unfused_velora_path_fp64():
    x = batch()
    fused, unfused = with_velora(lora()), with_velora(lora(), fuse_lora=False)
    assert all(isinstance(m, FusedLoRAMixin) for m in layers(fused))
    assert not any(isinstance(m, FusedLoRAMixin) for m in layers(unfused))
    for _ in range(2):  # first call builds v from the batch, second reuses it
        out_f, gx_f, grads_f = run(fused, x)
        out_u, gx_u, grads_u = run(unfused, x)
        torch.testing.assert_close(out_f, out_u, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx_f, gx_u, rtol=1e-12, atol=1e-12)
        assert grads_f.keys() == grads_u.keys() and len(grads_f) == 4
        for name in grads_f:
            torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-12, atol=1e-12)
    for a, b in zip(fused.buffers(), unfused.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # v built the same way on both paths


def test_fused_equals_plain_lora_autograd_when_subtokens_lie_on_v():
    # every sub-token of the LoRA input is a multiple of one vector u: VeLoRA is then exact, so the fused layer
    # must give plain peft LoRA's output and all its gradients (only `up` stays, so its input is x itself)
    u = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, 1.5, -1.0, 2.0], dtype=torch.float64)  # (M,)
    coeffs = torch.randn(6, D // M, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # (T, G)
    x = (coeffs.unsqueeze(-1) * u).reshape(6, D)  # (T, D), sub-tokens on span(u)

    def single(model):
        model.base_model.model.down = nn.Identity()  # only `up` is adapted, its input is x
        return model

    plain = single(lora())
    fused = with_velora(single(lora()), target_modules=["up"])
    assert fused_ran(fused, x)
    out_p, gx_p, grads_p = run(plain, x)
    out_f, gx_f, grads_f = run(fused, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-12, atol=1e-12)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-12, atol=1e-12)


def test_fused_trains_the_base_bias_when_peft_unfreezes_it():
    x = batch()
    fused, unfused = with_velora(lora(bias="all")), with_velora(lora(bias="all"), fuse_lora=False)
    assert fused_ran(fused, x)
    grads_f, grads_u = run(fused, x)[2], run(unfused, x)[2]
    assert any(name.endswith("base_layer.bias") for name in grads_f) and grads_f.keys() == grads_u.keys()
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank,pad", [(2, False), (1, True)], ids=["rank2", "pad"])
def test_fused_handles_rank_and_padding(rank, pad):
    size = 12 if pad else M  # 12 does not divide 32 or 24: zero-padded last group
    x = batch()
    fused = with_velora(lora(), sub_token_size=size, rank=rank, pad=pad, scale=0.5)
    unfused = with_velora(lora(), sub_token_size=size, rank=rank, pad=pad, scale=0.5, fuse_lora=False)
    assert fused_ran(fused, x)
    for a, b in zip(run(fused, x)[2].values(), run(unfused, x)[2].values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_fp32_training_matches_unfused():
    x = batch(torch.float32)
    models = [with_velora(lora(torch.float32)), with_velora(lora(torch.float32), fuse_lora=False)]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for _ in range(5):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base_dtype,adapter_dtype,tolerance", [
    (torch.bfloat16, torch.float32, dict(rtol=2e-2, atol=1e-2)),  # peft's default for a bf16 model
    (torch.float32, torch.float64, dict(rtol=1e-6, atol=1e-6)),
], ids=["bf16-base-fp32-adapter", "fp32-base-fp64-adapter"])
def test_fused_with_a_wider_adapter_matches_peft(base_dtype, adapter_dtype, tolerance):
    def build(fuse_lora):
        model = lora(base_dtype)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(adapter_dtype)
        return with_velora(model, fuse_lora=fuse_lora)

    x = batch(base_dtype)
    fused, unfused = build(True), build(False)
    assert fused_ran(fused, x)
    for _ in range(2):
        out_f, gx_f, grads_f = run(fused, x)
        out_u, gx_u, grads_u = run(unfused, x)
        assert out_f.dtype == out_u.dtype == base_dtype and gx_f.dtype == base_dtype
        torch.testing.assert_close(out_f, out_u, **tolerance)
        torch.testing.assert_close(gx_f, gx_u, **tolerance)
        for name in grads_u:
            assert grads_f[name].dtype == grads_u[name].dtype
            torch.testing.assert_close(grads_f[name], grads_u[name], **tolerance)
    x32 = batch(torch.float32).requires_grad_(True) if base_dtype == torch.float32 else None
    if x32 is not None:  # same saved bytes as peft's path with the cast (z and h in the adapter dtype)
        assert saved_activation_bytes(fused, lambda: fused(x32).sum()) == \
            saved_activation_bytes(unfused, lambda: unfused(x32).sum())


# ---- memory ----------------------------------------------------------------------------------------------


def test_fused_saves_exactly_what_the_unfused_path_saves():
    from velora.memory import SavedActivationMeter

    x = batch(torch.float32).requires_grad_(True)
    fused, unfused = with_velora(lora(torch.float32)), with_velora(lora(torch.float32), fuse_lora=False)
    fused_bytes = saved_activation_bytes(fused, lambda: fused(x).sum())
    unfused_bytes = saved_activation_bytes(unfused, lambda: unfused(x).sum())
    assert fused_bytes == unfused_bytes
    with SavedActivationMeter(fused) as meter:  # the meter's hooks only watch: the fused path still runs
        out = fused(x)
    assert type(out.grad_fn).__name__ == "LoRAVeLoRAFunctionBackward"  # `down` ran fused under the meter
    assert meter.total_bytes == fused_bytes


# ---- when peft's own forward runs ------------------------------------------------------------------------


def test_falls_back_to_peft_outside_the_plain_case():
    x = batch()
    model = with_velora(lora())
    assert fused_ran(model, x)
    model.eval()
    assert not fused_ran(model, x)
    model.train()

    seen = []
    handle = layers(model)[0].lora_B["default"].register_forward_hook(lambda *args: seen.append(1))
    assert not fused_ran(model, x) and seen == [1]  # a user hook on a skipped child keeps peft's path
    handle.remove()

    single = with_velora(lora(torch.float32))
    assert fused_ran(single, x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_ran(single, x.float())

    narrow = lora()  # fp64 base, fp32 adapters: peft adds in fp64 after its own casts; not fused
    for name, param in narrow.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    assert not fused_ran(with_velora(narrow), x)

    with pytest.warns(UserWarning, match="lora_dropout=0.1"):
        dropout = with_velora(lora(lora_dropout=0.1))
    assert not fused_ran(dropout, x)

    dora = with_velora(lora(use_dora=True))
    assert not fused_ran(dora, x)

    two = lora()
    two.add_adapter("second", LoraConfig(r=R, target_modules=["up", "down"], init_lora_weights=False))
    two.to(torch.float64)
    two.base_model.set_adapter(["default", "second"])
    two = with_velora(two)
    assert not fused_ran(two, x)


def test_fallback_numbers_equal_fused_numbers_for_a_frozen_adapter():
    # frozen lora_A: VeLoRA is inactive, so peft's path runs; it must still be plain LoRA
    x = batch()
    model, plain = with_velora(lora()), lora()
    for m in (model, plain):
        for name, p in m.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    assert not fused_ran(model, x)
    for a, b in zip(run(model, x)[2].values(), run(plain, x)[2].values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- surgery ---------------------------------------------------------------------------------------------


def test_remove_copy_pickle_and_keys():
    model = lora()
    keys = list(model.state_dict())
    fused = with_velora(model)
    assert [k for k in fused.state_dict() if "velora" not in k] == keys
    clone = copy.deepcopy(fused)
    assert all(isinstance(m, FusedLoRAMixin) for m in layers(clone))
    restored = pickle.loads(pickle.dumps(layers(fused)[0]))
    assert isinstance(restored, FusedLoRAMixin)
    remove_velora(fused)
    assert all(type(m) is PeftLinear for m in layers(fused))
    assert list(fused.state_dict()) == keys


def test_fuse_lora_must_be_a_bool():
    with pytest.raises(ValueError, match="fuse_lora='yes' must be True or False"):
        VeLoRAConfig(fuse_lora="yes")
