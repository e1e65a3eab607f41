"""VeLoRA in adapter mode on peft LoRA / DoRA models: exact lora_A gradients, fewer saved bytes than LoRA alone
(and no more than peft's own VeLoRA variant), training, refusal of peft's variant, removal, save/load."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from references import capture_io, saved_activation_bytes  # noqa: E402

from velora import VeLoRAConfig, apply_velora, remove_velora, velora_modules  # noqa: E402
from velora.core.layers import load_peft_velora_state  # noqa: E402
from velora.core.subtoken import compress, reconstruct  # noqa: E402
from velora.training.models import build_config, build_model  # noqa: E402

torch.set_num_threads(1)

VOCAB = 256
SUB_TOKEN_SIZE = 16  # llama-tiny: hidden 64 -> 4 groups, intermediate 192 -> 12 groups
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- helpers -------------------------------------------------------------------------------------------


def corpus_batch(batch: int, seq: int, offset: int = 0) -> torch.Tensor:
    """Bytes of a standard-library source file as token ids (vocab 256). -> (batch, seq)"""
    with open(os.__file__, "rb") as fh:
        data = fh.read()
    start = offset * batch * seq
    ids = torch.frombuffer(bytearray(data[start : start + batch * seq]), dtype=torch.uint8)
    return ids.long().view(batch, seq)


def lora_model(use_dora: bool = False, seed: int = 0, velora_config=None, **lora_kwargs) -> nn.Module:
    torch.manual_seed(seed)
    base = build_model(build_config("llama-tiny", vocab_size=VOCAB))
    config = LoraConfig(r=8, target_modules="all-linear", lora_dropout=lora_kwargs.pop("lora_dropout", 0.0),
                        use_dora=use_dora, velora_config=velora_config, **lora_kwargs)
    return get_peft_model(base, config)


def velora_config(**overrides) -> VeLoRAConfig:
    kwargs = dict(sub_token_size=SUB_TOKEN_SIZE, target_modules=ALL_LINEAR, mode="adapter")
    kwargs.update(overrides)
    return VeLoRAConfig(**kwargs)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


# ---- surgery ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_mode_wraps_lora_a_only_and_gives_exact_factored_grads(use_dora):
    # init_lora_weights=False: random lora_B, so lora_A receives a non-zero gradient from the first step
    model = apply_velora(lora_model(use_dora, init_lora_weights=False), velora_config())
    wrapped = velora_modules(model)
    assert len(wrapped) == 7 * 2
    assert all(name.endswith(".lora_A.default") for name in wrapped)
    for module in model.modules():
        if hasattr(module, "base_layer"):
            assert type(module.base_layer) is nn.Linear  # the frozen base layer is untouched
            assert not module.base_layer.weight.requires_grad

    # reference: grad_A = Gᵀ x̂ with x̂ the reconstruction of the captured lora_A input
    inputs, grads, handles = capture_io(wrapped)
    ids = corpus_batch(2, 32)
    lm_loss(model, ids).backward()
    for handle in handles:
        handle.remove()
    for name, module in wrapped.items():
        x = inputs[name].reshape(-1, module.in_features)  # (T, D)
        grad_out = grads[name].reshape(-1, module.out_features)  # (T, r)
        x_hat = reconstruct(compress(x, module.velora_v), module.velora_v, module.in_features)  # (T, D)
        expected = grad_out.t() @ x_hat  # (r, D)
        # v comes from the data (DoRA's identity probe of lora_A must not initialise it)
        mean = x.view(-1, SUB_TOKEN_SIZE).mean(0)  # (M,)
        torch.testing.assert_close(module.velora_v[:, 0], mean / mean.norm())
        assert module.weight.grad.abs().sum() > 0
        torch.testing.assert_close(module.weight.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_mode_saves_exactly_the_lora_a_inputs(use_dora):
    ids = corpus_batch(2, 32)
    plain = lora_model(use_dora)
    compressed = apply_velora(lora_model(use_dora), velora_config())
    plain_bytes = saved_activation_bytes(plain, lambda: lm_loss(plain, ids))
    velora_bytes = saved_activation_bytes(compressed, lambda: lm_loss(compressed, ids))

    # Per layer, three lora_A inputs are kept by nobody else (the base layers are frozen): the attention norm
    # output (shared by q/k/v), the MLP norm output (shared by gate/up) and the down_proj input. The o_proj
    # input is a view of the attention output, which scaled_dot_product_attention saves anyway, so compressing
    # o_proj frees nothing. VeLoRA drops the three and keeps one z (T, D/M) per lora_A instead. (DoRA's identity
    # probe of lora_A saves an eye(D) in both models; its graph dies at once because peft detaches the result.)
    tokens, hidden, inner, layers = ids.numel(), 64, 192, 2
    dropped = layers * tokens * 4 * (2 * hidden + inner)
    kept = layers * tokens * 4 * (6 * hidden + inner) // SUB_TOKEN_SIZE
    assert velora_bytes < plain_bytes
    assert plain_bytes - velora_bytes == dropped - kept


def test_saved_bytes_not_more_than_peft_velora():
    from peft import VeloraConfig

    ids = corpus_batch(2, 32)
    # num_groups=4 on both sides: M=16 for d=64 and M=48 for the 192-wide down_proj, as peft computes it
    theirs = lora_model(velora_config=VeloraConfig(num_groups=4, init_type="batch_average_once"))
    ours = apply_velora(lora_model(), velora_config(sub_token_size=None, num_groups=4))
    their_bytes = saved_activation_bytes(theirs, lambda: lm_loss(theirs, ids))
    our_bytes = saved_activation_bytes(ours, lambda: lm_loss(ours, ids))
    assert our_bytes <= their_bytes


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_with_velora_trains(use_dora):
    model = apply_velora(lora_model(use_dora), velora_config())
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(12):
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, corpus_batch(4, 64, offset=step % 3))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # the frozen base weights never move


# ---- interplay with peft -------------------------------------------------------------------------------


def test_refuses_a_layer_with_peft_velora_variant():
    from peft import VeloraConfig

    model = lora_model(velora_config=VeloraConfig(num_groups=4))
    with pytest.raises(ValueError, match="already uses peft's own VeLoRA variant"):
        apply_velora(model, velora_config())
    assert not velora_modules(model)  # nothing half-wrapped


def test_lora_dropout_warns_about_the_uncompressed_mask():
    with pytest.warns(UserWarning, match="lora_dropout=0.1 keeps a full-size dropout mask"):
        apply_velora(lora_model(lora_dropout=0.1), velora_config())


def test_remove_velora_restores_the_peft_model():
    model = lora_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}
    apply_velora(model, velora_config())
    lm_loss(model, corpus_batch(2, 32)).backward()  # initialises v
    assert any(key.endswith("velora_v") for key in model.state_dict())
    remove_velora(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert {name: type(m) for name, m in model.named_modules()} == classes


@pytest.mark.parametrize("from_pretrained", [False, True], ids=["get_peft_model", "from_pretrained"])
def test_save_pretrained_keeps_v_and_reload_resumes_exactly(tmp_path, from_pretrained):
    model = apply_velora(lora_model(), velora_config())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, corpus_batch(2, 32, offset=step)).backward()
        optimizer.step()
    with warnings.catch_warnings():
        # peft flags every 0-d/1-d tensor under lora_A as a possibly unsharded ZeRO-3 shard; velora_initialised is 0-d
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
        model.save_pretrained(tmp_path)

    if from_pretrained:
        torch.manual_seed(0)
        base = build_model(build_config("llama-tiny", vocab_size=VOCAB))
        reloaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    else:
        reloaded = lora_model(seed=0)
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(reloaded, load_peft_weights(str(tmp_path)))  # LoRA weights, before VeLoRA
    apply_velora(reloaded, velora_config())
    assert not any(bool(m.velora_initialised) for m in velora_modules(reloaded).values())
    load_peft_velora_state(reloaded, str(tmp_path))

    original, restored = model.state_dict(), reloaded.state_dict()
    assert set(original) == set(restored)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert all(m._velora_ready for m in velora_modules(reloaded).values())

    # same weights and same v -> bitwise the same gradients on the next batch (v is not re-initialised)
    reloaded.train()
    ids = corpus_batch(2, 32, offset=5)
    for m in (model, reloaded):
        m.zero_grad(set_to_none=True)
        lm_loss(m, ids).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, p in reloaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[name]), name


def test_load_peft_velora_state_errors(tmp_path):
    plain = lora_model()
    plain.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no VeLoRA layers"):
        load_peft_velora_state(lora_model(), str(tmp_path))
    with pytest.raises(ValueError, match="holds no VeLoRA buffers"):
        load_peft_velora_state(apply_velora(lora_model(), velora_config()), str(tmp_path))
