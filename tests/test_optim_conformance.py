"""One conformance suite every velora.optim optimizer passes (parametrised over FACTORIES)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from optim_helpers import FACTORIES, lm_loss, real_text_tokens, toy_batch, toy_model

from velora.optim import Flora, GaLoreAdamW, optimizer_state_bytes
from velora.optim.projections import compression_plan
from velora.optim.quant import quantized_bytes
from velora.training.models import build_config, build_model

torch.set_num_threads(1)

NAMES = list(FACTORIES)


def _train(model, optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        tokens = toy_batch(step)
        loss = lm_loss(model(tokens), tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_state_roundtrip_and_bitwise_resume(name):
    # uninterrupted: 7 steps (kappa = update_proj_gap = 3: boundaries at steps 3 and 6)
    model_a = toy_model()
    optimizer_a = FACTORIES[name](model_a)
    _train(model_a, optimizer_a, range(7))

    # interrupted after 2 steps, state through torch.save / torch.load(weights_only=True)
    model_b = toy_model()
    optimizer_b = FACTORIES[name](model_b)
    _train(model_b, optimizer_b, range(2))
    saved = _roundtrip({"model": model_b.state_dict(), "optimizer": optimizer_b.state_dict()})

    model_c = toy_model(seed=123)  # different init: everything must come from the checkpoint
    optimizer_c = FACTORIES[name](model_c)
    model_c.load_state_dict(saved["model"])
    optimizer_c.load_state_dict(saved["optimizer"])
    for before, after in zip(optimizer_b.state.values(), optimizer_c.state.values()):
        for key in before:
            assert before[key].dtype == after[key].dtype, f"{key} changed dtype on load"
    _train(model_c, optimizer_c, range(2, 7))

    for (param_name, expected), actual in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(expected, actual), f"{name}: {param_name} differs after resume"


@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_update_in_fp32(name):
    """A bf16 parameter gets exactly the fp32 update of its (bf16) value, rounded back to bf16."""
    model_bf16 = toy_model()
    optimizer_bf16 = FACTORIES[name](model_bf16)  # applies GradNormLoRP surgery where needed
    model_bf16.to(torch.bfloat16)
    model_fp32 = copy.deepcopy(model_bf16).float()
    optimizer_fp32 = FACTORIES[name](toy_model())  # same hyper-parameters, rebound below
    optimizer_fp32.param_groups.clear()
    optimizer_fp32.state.clear()
    params_bf16 = dict(model_bf16.named_parameters())
    params_fp32 = dict(model_fp32.named_parameters())
    index = {id(p): n for n, p in params_bf16.items()}
    for group in optimizer_bf16.param_groups:
        group_fp32 = {k: v for k, v in group.items() if k != "params"}
        group_fp32["params"] = [params_fp32[index[id(p)]] for p in group["params"]]
        optimizer_fp32.add_param_group(group_fp32)

    initial = {n: p.detach().clone() for n, p in params_bf16.items()}
    for step in range(4):
        tokens = toy_batch(step)
        model_fp32.zero_grad(set_to_none=True)
        lm_loss(model_fp32(tokens), tokens).backward()
        for param_name, param in params_fp32.items():
            if param.grad is not None:
                rounded = param.grad.to(torch.bfloat16)
                params_bf16[param_name].grad = rounded
                param.grad = rounded.float()
        optimizer_bf16.step()
        optimizer_fp32.step()
        for param_name, param in params_bf16.items():
            assert param.dtype == torch.bfloat16
            assert torch.equal(param, params_fp32[param_name].to(torch.bfloat16)), f"{name}: {param_name} step {step}"
            params_fp32[param_name].data.copy_(param.float())  # continue both from the stored bf16 value
    changed = [n for n, p in params_bf16.items() if p.requires_grad and not torch.equal(p, initial[n])]
    assert changed, f"{name}: no bf16 parameter changed"


def _expected_state_bytes(name: str, optimizer) -> int:
    """The formulas of docs/optim.md, evaluated on the optimizer's parameters."""
    total = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None and param not in optimizer.state:
                continue
            shape, numel = tuple(param.shape), param.numel()
            if isinstance(optimizer, Flora):
                moment = quantized_bytes if group["eight_bit"] else (lambda n: 4 * n)
                total += 4  # step
                plan = compression_plan(shape, group["rank"], project=group["project"])
                if plan is not None:
                    total += 8 + moment(plan.kept_dim * plan.rank)  # seed + (k, r) momentum
                else:
                    total += moment(numel)
                if group["base"] == "adafactor":
                    total += 4 * (shape[0] + shape[1]) if len(shape) == 2 else 4 * numel
                else:
                    total += 4 * numel
            else:
                assert isinstance(optimizer, GaLoreAdamW)
                moment = quantized_bytes if group["eight_bit"] else (lambda n: 4 * n)
                total += 4  # step
                if group["rank"] is None:
                    total += 2 * moment(numel)
                else:
                    rank = min(group["rank"], *shape)
                    total += 2 * moment(rank * max(shape)) + 4 * rank * min(shape)  # moments + projector
    return total


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_match_documented_formula(name):
    model = toy_model()
    optimizer = FACTORIES[name](model)
    _train(model, optimizer, range(2))
    assert optimizer_state_bytes(optimizer) == _expected_state_bytes(name, optimizer)


def test_compressed_state_is_smaller_than_adamw():
    model = toy_model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, adamw, range(1))
    adamw_bytes = optimizer_state_bytes(adamw)
    for name in ("flora-adafactor", "flora-8bit", "galore", "galore-8bit"):
        model = toy_model()
        optimizer = FACTORIES[name](model)
        _train(model, optimizer, range(1))
        assert optimizer_state_bytes(optimizer) < adamw_bytes, name


BAD_ARGS = [
    (lambda p: Flora([p], lr=1e-2, rank=0), "rank=0"),
    (lambda p: Flora([p], lr=1e-2, rank=-3), "rank=-3"),
    (lambda p: Flora([p], lr=1e-2, rank=4, kappa=0), "kappa=0"),
    (lambda p: Flora([p], lr=1e-2, rank=4, base="sgd"), "base='sgd'"),
    (lambda p: Flora([{"params": []}, {"params": [p]}], lr=1e-2, rank=4), "no params"),
    (lambda p: Flora([torch.zeros(3, dtype=torch.long)], lr=1e-2, rank=4), "non-floating"),
    (lambda p: GaLoreAdamW([{"params": [p], "rank": 0}]), "rank=0"),
    (lambda p: GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 0}]), "update_proj_gap=0"),
    (lambda p: GaLoreAdamW([{"params": [p], "rank": 2, "proj_type": "diag"}]), "proj_type='diag'"),
    (lambda p: GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "rank": 2}]), "1-D"),
    (lambda p: GaLoreAdamW([{"params": []}, {"params": [p]}]), "no params"),
    (lambda p: GaLoreAdamW([torch.zeros(2, 2, dtype=torch.int32)]), "non-floating"),
]


@pytest.mark.parametrize("make, fragment", BAD_ARGS, ids=[f for _, f in BAD_ARGS])
def test_bad_arguments_raise_one_line_errors(make, fragment):
    param = torch.nn.Parameter(torch.zeros(4, 6))
    with pytest.raises(ValueError) as info:
        make(param)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_gradnorm_lorp_bad_arguments():
    from optim_helpers import _gradnorm

    with pytest.raises(ValueError, match="proj_rank=4 >= GradNormLoRP rank=4"):
        _gradnorm(toy_model(), proj_rank=4)
    with pytest.raises(ValueError, match="proj_rank=0"):
        _gradnorm(toy_model(), proj_rank=0)
    from velora.optim import gradnorm_lorp_optimizer

    with pytest.raises(ValueError, match="no GradNormLoRP layers"):
        gradnorm_lorp_optimizer(toy_model(), lr=1e-3, proj_rank=2)


# --- loss goes down on a tiny LLaMA trained on real text (stdlib source bytes) ------------------------

LLAMA_SETTINGS = {
    "flora-adafactor": lambda m: Flora(m, lr=0.1, rank=8, kappa=10),
    "flora-adamw": lambda m: Flora(m, lr=3e-3, rank=8, kappa=10, base="adamw"),
    "flora-8bit": lambda m: Flora(m, lr=0.1, rank=8, kappa=10, eight_bit=True),
    "flora-update": lambda m: Flora(m, lr=0.1, rank=8, kappa=10, momentum="update"),
    "flora-exact-current": lambda m: Flora(m, lr=0.1, rank=8, kappa=10, exact_current=True),
    "flora-orthonormal": lambda m: Flora(m, lr=0.1, rank=8, kappa=10, orthogonal=True),
    "flora-authors": lambda m: Flora.authors_code(m, lr=0.1, rank=8, kappa=10),
    "flora-alg2": lambda m: Flora.paper_alg2(m, lr=0.1, rank=8, kappa=10),
    "flora-residual": lambda m: Flora(m, lr=0.1, rank=8, kappa=10, residual=True),
    "flora-adamw-residual": lambda m: Flora(m, lr=3e-3, rank=8, kappa=10, base="adamw", residual=True),
    "flora-adamw-update-exact": lambda m: Flora(m, lr=3e-3, rank=8, kappa=10, base="adamw", momentum="update",
                                                exact_current=True, orthogonal=True),
    "flora-8bit-update-exact": lambda m: Flora(m, lr=0.1, rank=8, kappa=10, eight_bit=True, momentum="update",
                                               exact_current=True),
    "galore": lambda m: _llama_galore(m, eight_bit=False),
    "galore-reproject": lambda m: _llama_galore(m, eight_bit=False, reproject=True),
    "galore-8bit": lambda m: _llama_galore(m, eight_bit=True),
    "gradnorm-lorp": lambda m: _llama_gradnorm(m),
}


def _llama_galore(model, eight_bit, reproject=False):

    from velora.optim import split_param_groups

    options = dict(rank=8, update_proj_gap=10, scale=0.25, reproject_moments=reproject)
    return GaLoreAdamW(split_param_groups(model, options), lr=1e-2, eight_bit=eight_bit)


def _llama_gradnorm(model):
    from optim_helpers import _gradnorm

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return _gradnorm(model, lr=3e-3, gap=10, targets=targets, rank=8, proj_rank=4)


@pytest.mark.parametrize("name", list(LLAMA_SETTINGS))
def test_loss_goes_down_on_tiny_llama_real_text(name):
    torch.manual_seed(0)
    model = build_model(build_config("llama-tiny", vocab_size=256))
    optimizer = LLAMA_SETTINGS[name](model)
    tokens = real_text_tokens()
    seq, batch = 32, 8
    generator = torch.Generator().manual_seed(0)
    held_out = tokens[-(batch * seq):].view(batch, seq)  # (B, T), never trained on
    train_tokens = tokens[: -(batch * seq)]

    def held_out_loss() -> float:
        with torch.no_grad():
            return model(input_ids=held_out, labels=held_out).loss.item()

    before = held_out_loss()
    for _ in range(30):
        starts = torch.randint(0, train_tokens.numel() - seq, (batch,), generator=generator)
        inputs = torch.stack([train_tokens[s : s + seq] for s in starts.tolist()])  # (B, T)
        loss = model(input_ids=inputs, labels=inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert math.isfinite(after)
    assert after < before - 1.0, f"{name}: held-out loss {before:.3f} -> {after:.3f}"
