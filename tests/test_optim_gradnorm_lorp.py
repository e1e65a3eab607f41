"""GradNormLoRP (eq. 8-12): identity at init, merge, magnitude learning, projected factor state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import velora
from velora.methods.gradnorm_lorp.model import GradNormLoRPLinear, gradnorm_lorp_modules
from velora.optim import gradnorm_lorp_optimizer, optimizer_state_bytes
from velora.training.models import build_config, build_model

torch.set_num_threads(1)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama():
    torch.manual_seed(0)
    return build_model(build_config("llama-tiny", vocab_size=256))


def _tokens(seed=0):
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_weight_equals_w0_at_init_and_outputs_unchanged():
    model = _llama()
    tokens = _tokens()
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS}
    velora.apply_gradnorm_lorp(model, velora.GradNormLoRPConfig(rank=4, alpha=8, target_modules=TARGETS))
    modules = gradnorm_lorp_modules(model)
    assert set(modules) == set(originals)
    for name, module in modules.items():
        assert torch.equal(module.merged_weight(), originals[name])  # bitwise: m / ||W0||_c == 1.0
        assert not module.weight.requires_grad and module.magnitude.requires_grad
        assert module.lora_I.requires_grad and module.lora_J.requires_grad
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, before)


def test_forward_matches_the_formula_with_autograd():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = GradNormLoRPLinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_I.normal_()
        layer.magnitude.mul_(torch.linspace(0.5, 1.5, 7))
    x = torch.randn(5, 12)
    # eq. 9 written out: W = m * (W0 + s I J) / ||W0 + s I J||_c, norms over each output neuron's weights
    params = [layer.magnitude, layer.lora_I, layer.lora_J]
    direction = base.weight + 2.0 * layer.lora_I @ layer.lora_J
    expected = x @ (layer.magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)).T + base.bias
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    actual = layer(x)
    actual_grads = torch.autograd.grad(actual.square().sum(), params)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want)


def _train(model, optimizer, steps):
    magnitudes = []
    module = next(iter(gradnorm_lorp_modules(model).values()))
    for step in range(steps):
        tokens = _tokens(step)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        magnitudes.append(module.magnitude.detach().clone())
    return module, magnitudes


def test_magnitude_learns_and_merge_reproduces_outputs():
    model = _llama()
    velora.apply_gradnorm_lorp(model, velora.GradNormLoRPConfig(rank=4, alpha=8, target_modules=TARGETS))
    optimizer = gradnorm_lorp_optimizer(model, lr=1e-2, proj_rank=2, update_proj_gap=3)
    module, magnitudes = _train(model, optimizer, 7)  # crosses projector refreshes at steps 3 and 6
    initial = module.weight.norm(dim=1)
    assert not torch.allclose(magnitudes[-1], initial)
    for previous, current in zip(magnitudes, magnitudes[1:]):
        assert not torch.equal(previous, current)  # changes every step
    # never reset to the current row norms of W0 + s I J (the "re-initialised magnitude" failure)
    direction_norm = (module.weight + module.scaling * module.lora_I @ module.lora_J).norm(dim=1)
    assert not torch.allclose(module.magnitude, direction_norm, atol=1e-4)
    tokens = _tokens(99)
    with torch.no_grad():
        trained = model(input_ids=tokens).logits
        velora.merge_gradnorm_lorp(model)
        merged = model(input_ids=tokens).logits
    assert not gradnorm_lorp_modules(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS)
    assert torch.equal(merged, trained)


def test_factor_state_is_projected_below_lora_rank():
    model = _llama()
    velora.apply_gradnorm_lorp(model, velora.GradNormLoRPConfig(rank=8, alpha=16, target_modules=TARGETS))
    optimizer = gradnorm_lorp_optimizer(model, lr=1e-2, proj_rank=2, update_proj_gap=5, eight_bit=False)
    module, _ = _train(model, optimizer, 1)
    out_features, in_features = module.weight.shape
    state_I, state_J = optimizer.state[module.lora_I], optimizer.state[module.lora_J]
    assert state_I["exp_avg"].shape == (out_features, 2)  # I (out, 8): right projection 8 -> 2
    assert state_J["exp_avg"].shape == (2, in_features)  # J (8, in): left projection 8 -> 2
    assert state_I["projector"].shape == (8, 2) and state_J["projector"].shape == (8, 2)
    # same trainable params with plain AdamW keep (out, 8) + (8, in) moments: more bytes
    model_adamw = _llama()
    velora.apply_gradnorm_lorp(model_adamw, velora.GradNormLoRPConfig(rank=8, alpha=16, target_modules=TARGETS))
    adamw = torch.optim.AdamW([p for p in model_adamw.parameters() if p.requires_grad], lr=1e-2)
    _train(model_adamw, adamw, 1)
    assert optimizer_state_bytes(optimizer) < optimizer_state_bytes(adamw)


def test_config_json_freezing_and_errors():
    config = velora.GradNormLoRPConfig(rank=4, alpha=8, target_modules=("q_proj",), freeze_non_targeted=True)
    assert velora.GradNormLoRPConfig.from_json(config.to_json()) == config
    model = velora.apply_gradnorm_lorp(_llama(), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("q_proj" in n and n.rsplit(".", 1)[-1] in ("magnitude", "lora_I", "lora_J")
                             for n in trainable)
    regex = velora.GradNormLoRPConfig(rank=2, target_modules=r"model\.layers\.0\.mlp\..*")
    assert len(gradnorm_lorp_modules(velora.apply_gradnorm_lorp(_llama(), regex))) == 3
    for kwargs, fragment in ((dict(rank=0), "rank=0"), (dict(rank=2, alpha=0), "alpha=0"),
                             (dict(rank=2, target_modules=()), "target_modules is empty")):
        with pytest.raises(ValueError, match=fragment):
            velora.GradNormLoRPConfig(**kwargs)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        velora.apply_gradnorm_lorp(_llama(), velora.GradNormLoRPConfig(rank=2, target_modules=("query",)))
    with pytest.raises(ValueError, match="no GradNormLoRP layers"):
        velora.merge_gradnorm_lorp(_llama())
