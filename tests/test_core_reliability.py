"""VeLoRA op and layer under hostile use (issue #13, items 4, 6-9, 11, 12): each case is correct against a
reference (a model built normally, the run without checkpointing, plain autograd) or refused in one line."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import velora
from velora.core.functional import DOUBLE_BACKWARD_REFUSED, velora_linear
from velora.core.subtoken import compress, orthonormalise, reconstruct

torch.set_num_threads(1)


def mlp(seed=0, dtype=torch.float32, device=None) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32, device=device), nn.Tanh(), nn.Linear(32, 16, device=device)).to(dtype)


def on_span(tokens: int, in_features: int, directions: torch.Tensor, seed=0) -> torch.Tensor:
    """(T, D) whose every sub-token lies in span(V), where VeLoRA's weight gradient is exact."""
    size, rank = directions.shape
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, in_features // size, rank, dtype=directions.dtype, generator=generator)
    return reconstruct(z, directions, in_features)  # (T, D)


def step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward/backward with a fixed upstream gradient; the parameter grads (and zeroes them)."""
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def assert_equal_dicts(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# ---- 4. meta-device init, to_empty, a plain checkpoint -----------------------------------------------------


def _dirty_the_allocator() -> None:
    # freed blocks full of 0xFF bytes: what to_empty() hands out next is visibly uninitialised, as on a busy host
    junk = [torch.full((n,), -1, dtype=torch.int8) for n in (1, 8, 64, 512, 4096, 32768) for _ in range(8)]
    del junk


@pytest.mark.parametrize("init", ["batch_average_once", "ema", "random", "tensor"])
def test_meta_init_then_plain_checkpoint_equals_a_model_built_on_cpu(init):
    user = torch.arange(16, dtype=torch.float32) - 3.5
    config = velora.VeLoRAConfig(sub_token_size=16, target_modules=["0", "2"], init=user if init == "tensor" else init,
                                 ema_decay=0.5)
    plain_state = mlp(seed=3).state_dict()  # a checkpoint saved without VeLoRA
    reference = velora.apply_velora(mlp(seed=3), config)

    with torch.device("meta"):
        model = velora.apply_velora(mlp(seed=0), config)
    _dirty_the_allocator()
    model.to_empty(device="cpu")
    result = model.load_state_dict(plain_state, strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in reference.state_dict() if ".velora_" in k)

    for seed in (1, 2):  # with ema the second step moves v
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed)) + 0.5
        assert_equal_dicts(step(model, x), step(reference, x))
        for name, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name


def test_meta_init_then_a_velora_checkpoint_restores_v_without_reinitialising():
    config = velora.VeLoRAConfig(sub_token_size=16, target_modules=["0", "2"])
    trained = velora.apply_velora(mlp(seed=3), config)
    trained(torch.randn(8, 64) + 1)
    with torch.device("meta"):
        model = velora.apply_velora(mlp(), config)
    _dirty_the_allocator()
    model.to_empty(device="cpu")
    model.load_state_dict(trained.state_dict())
    x = torch.randn(8, 64) - 3  # a very different batch must not re-initialise v
    assert_equal_dicts(step(model, x), step(trained, x))
    assert torch.equal(model[0].velora_v, trained[0].velora_v)


def test_meta_buffers_left_by_an_assign_load_are_refused_in_one_line():
    with torch.device("meta"):
        model = velora.apply_velora(mlp(), velora.VeLoRAConfig(sub_token_size=16, target_modules="0"))
    model.load_state_dict(mlp(seed=3).state_dict(), strict=False, assign=True)  # parameters real, VeLoRA state meta
    with pytest.raises(ValueError, match="'0' still has velora_v on the meta device; call model.to_empty"):
        model(torch.randn(2, 64))


def test_reset_parameters_gives_fresh_weights_and_fresh_v():
    model = velora.apply_velora(mlp(), velora.VeLoRAConfig(sub_token_size=16, target_modules="0"))
    model(torch.randn(4, 64) + 1)
    assert model[0]._velora_ready
    model[0].reset_parameters()
    assert not model[0]._velora_ready and not bool(model[0].velora_initialised)
    assert torch.equal(model[0].velora_v, torch.zeros(16, 1))
    x = torch.randn(4, 64) - 2
    model(x)
    expected = x.reshape(-1, 16).mean(0)
    torch.testing.assert_close(model[0].velora_v[:, 0], expected / expected.norm())


@pytest.mark.parametrize("bad_v,message", [(torch.full((16, 1), 4e16), "not orthonormal"),
                                           (torch.full((16, 1), float("nan")), "non-finite"),
                                           (torch.zeros(16, 1), "not orthonormal")])
def test_first_training_forward_refuses_a_v_that_is_not_a_projection(bad_v, message):
    model = velora.apply_velora(mlp(), velora.VeLoRAConfig(sub_token_size=16, target_modules="0"))
    state = model.state_dict()
    state["0.velora_v"], state["0.velora_initialised"] = bad_v, torch.tensor(True)
    model.load_state_dict(state)
    model.eval()
    model(torch.randn(2, 64))  # evaluation runs the plain layer and never reads v
    model.train()
    with pytest.raises(ValueError, match=f"'0' is marked initialised but holds .*{message}.*reset_velora_state"):
        model(torch.randn(2, 64))


def test_a_valid_loaded_v_is_accepted_and_checked_once():
    trained = velora.apply_velora(mlp(), velora.VeLoRAConfig(sub_token_size=16, target_modules="0"))
    trained(torch.randn(4, 64) + 1)
    model = velora.apply_velora(mlp(seed=1), velora.VeLoRAConfig(sub_token_size=16, target_modules="0"))
    model.load_state_dict(trained.state_dict())
    model(torch.randn(4, 64))
    assert model[0]._velora_checked and torch.equal(model[0].velora_v, trained[0].velora_v)


# ---- 6. init="ema" under activation checkpointing ----------------------------------------------------------


class Checkpointed(nn.Module):
    """mlp() whose first two layers run under torch.utils.checkpoint (``reentrant`` None: no checkpointing)."""

    def __init__(self, reentrant: bool | str | None):
        super().__init__()
        self.net, self.reentrant = mlp(dtype=torch.float64), reentrant

    def forward(self, x):
        if self.reentrant is None:
            return self.net(x)
        if self.reentrant == "nested":  # a non-reentrant checkpoint inside another one
            inner = lambda t: checkpoint(lambda u: self.net[1](self.net[0](u)), t, use_reentrant=False)  # noqa: E731
            return self.net[2](checkpoint(inner, x, use_reentrant=False))
        hidden = checkpoint(lambda t: self.net[1](self.net[0](t)), x, use_reentrant=self.reentrant)
        return self.net[2](hidden)


@pytest.mark.parametrize("reentrant", [False, True, "nested"])
def test_ema_under_checkpointing_equals_the_run_without(reentrant):
    config = velora.VeLoRAConfig(sub_token_size=16, target_modules="net.0", init="ema", ema_decay=0.5)
    plain = velora.apply_velora(Checkpointed(None), config)
    ckpt = velora.apply_velora(Checkpointed(reentrant), config)
    for seed in range(4):
        x = torch.randn(6, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + seed - 1.5
        x.requires_grad_(reentrant is True)  # reentrant checkpointing needs an input that requires grad
        assert_equal_dicts(step(ckpt, x), step(plain, x))
        assert torch.equal(ckpt.net[0].velora_v, plain.net[0].velora_v)
        assert torch.equal(ckpt.net[0].velora_running_mean, plain.net[0].velora_running_mean)


# ---- 7. double backward ------------------------------------------------------------------------------------


def test_double_backward_through_the_weight_gradient_is_refused_in_one_line():
    V = orthonormalise(torch.randn(8, 1, dtype=torch.float64))
    x = on_span(10, 32, V).requires_grad_()
    W = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    loss = torch.tanh(velora_linear(x, W, None, V)).sum()
    (grad_w,) = torch.autograd.grad(loss, W, create_graph=True)
    plain_w = W.detach().clone().requires_grad_()
    (plain_grad_w,) = torch.autograd.grad(torch.tanh(F.linear(x, plain_w)).sum(), plain_w)
    torch.testing.assert_close(grad_w, plain_grad_w, rtol=1e-12, atol=1e-12)  # first order: still exact
    with pytest.raises(RuntimeError) as error:
        torch.autograd.grad(grad_w.pow(2).sum(), x)  # d/dx |dL/dW|^2
    assert str(error.value) == DOUBLE_BACKWARD_REFUSED and "\n" not in DOUBLE_BACKWARD_REFUSED


def test_input_gradient_penalty_through_a_velora_layer_is_exact():
    """d/dW |dL/dx|^2 (WGAN-GP, R1) differentiates the exact input gradient: equal to plain autograd on span(V)."""
    V = orthonormalise(torch.randn(8, 2, dtype=torch.float64))
    x = on_span(10, 32, V).requires_grad_()
    W = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def penalty_grads(linear):
        (grad_x,) = torch.autograd.grad(torch.tanh(linear(x, W, b)).pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.pow(2).sum(), (W, b))

    got = penalty_grads(lambda x, W, b: velora_linear(x, W, b, V))
    expected = penalty_grads(F.linear)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# ---- 8. zero and one token ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 64)])
@pytest.mark.parametrize("init", ["batch_average_once", "ema", "svd"])
def test_zero_token_batch_trains_with_zero_contribution_and_leaves_v_for_the_next(shape, init):
    config = velora.VeLoRAConfig(sub_token_size=16, target_modules=["0", "2"], init=init)
    model, fresh = velora.apply_velora(mlp(), config), velora.apply_velora(mlp(), config)
    empty = torch.randn(*shape, requires_grad=True)
    out = model(empty)
    assert out.shape == (*shape[:-1], 16)
    out.sum().backward()
    assert empty.grad.shape == empty.shape
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert not bool(model[0].velora_initialised)  # nothing to learn v from yet
    model.zero_grad(set_to_none=True)
    x = torch.randn(5, 64) + 1
    assert_equal_dicts(step(model, x), step(fresh, x))
    assert torch.equal(model[0].velora_v, fresh[0].velora_v)
    out = model(torch.zeros(0, 64))  # after init: the zero-token batch leaves v and the EMA alone
    out.sum().backward()
    assert torch.equal(model[0].velora_v, fresh[0].velora_v)


def test_one_token_gradients_equal_plain_autograd_on_span():
    V = orthonormalise(torch.randn(16, 1, dtype=torch.float64))
    layer = nn.Linear(64, 8, dtype=torch.float64)
    wrapped = velora.apply_velora(nn.Sequential(nn.Linear(64, 8, dtype=torch.float64)),
                                  velora.VeLoRAConfig(sub_token_size=16, target_modules="0", init=V))
    wrapped[0].load_state_dict(layer.state_dict(), strict=False)
    x = on_span(1, 64, V)
    got, expected = step(wrapped, x), step(layer, x)
    for name in ("weight", "bias"):
        torch.testing.assert_close(got[f"0.{name}"], expected[name], rtol=1e-12, atol=1e-12)


# ---- 9. rank r with fewer sub-tokens than r in the first batch ---------------------------------------------


@pytest.mark.parametrize("init", ["batch_average_once", "svd"])
def test_rank_above_first_batch_sub_tokens_keeps_shape_and_checkpoint_loads(init):
    config = velora.VeLoRAConfig(sub_token_size=8, rank=4, target_modules="0", init=init)
    model = velora.apply_velora(nn.Sequential(nn.Linear(16, 4)), config)
    x = torch.randn(1, 16) + 1  # 2 sub-tokens, rank 4
    model(x).sum().backward()
    v = model[0].velora_v
    assert v.shape == (8, 4)
    torch.testing.assert_close(v.t() @ v, torch.eye(4), rtol=0, atol=1e-6)
    if init == "batch_average_once":
        mean = x.reshape(2, 8).mean(0)
        torch.testing.assert_close(v[:, 0], mean / mean.norm())
    rows = x.reshape(2, 8)
    torch.testing.assert_close(rows - (rows @ v) @ v.t(), torch.zeros(2, 8), rtol=0, atol=1e-5)  # data in span
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = velora.apply_velora(nn.Sequential(nn.Linear(16, 4)), config)
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(reloaded[0].velora_v, v) and reloaded[0]._velora_ready
    again = velora.apply_velora(nn.Sequential(nn.Linear(16, 4)), config)
    again(x)
    assert torch.equal(again[0].velora_v, v)  # deterministic completion


# ---- 11. autocast ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_dtype", [torch.float64, torch.float32])
def test_autocast_follows_autocast_rules(model_dtype):
    V = orthonormalise(torch.randn(16, 1, dtype=torch.float64)).to(model_dtype)
    plain = nn.Sequential(nn.Linear(64, 8)).to(model_dtype)
    wrapped = velora.apply_velora(nn.Sequential(nn.Linear(64, 8)).to(model_dtype),
                                  velora.VeLoRAConfig(sub_token_size=16, target_modules="0", init=V))
    wrapped.load_state_dict(plain.state_dict(), strict=False)
    x = on_span(12, 64, V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = wrapped(x), plain(x)
    assert out.dtype == expected.dtype == (torch.float64 if model_dtype == torch.float64 else torch.bfloat16)
    assert torch.equal(out, expected)
    out.float().sum().backward()
    expected.float().sum().backward()
    tolerance = 1e-12 if model_dtype == torch.float64 else 2e-2
    torch.testing.assert_close(wrapped[0].weight.grad, plain[0].weight.grad, rtol=tolerance, atol=tolerance)


# ---- 12. fp16 z cannot overflow ----------------------------------------------------------------------------


def _large_same_sign_fp16(tokens: int, in_features: int, size: int, low=20000.0, high=30000.0) -> torch.Tensor:
    """Sub-tokens c·(1, ..., 1), c in [low, high]: on span of the uniform v, |z| = 4c > 65504 for M=16 and c > 16376."""
    levels = torch.linspace(low, high, tokens * (in_features // size)).view(tokens, -1, 1)
    return levels.expand(tokens, in_features // size, size).reshape(tokens, in_features).half()


def test_fp16_large_inputs_give_finite_weight_grads_close_to_the_plain_layer():
    size = 16
    uniform = torch.full((size,), 0.25)
    plain = nn.Sequential(nn.Linear(64, 8)).half()
    wrapped = velora.apply_velora(nn.Sequential(nn.Linear(64, 8)).half(),
                                  velora.VeLoRAConfig(sub_token_size=size, target_modules="0", init=uniform))
    wrapped.load_state_dict(plain.state_dict(), strict=False)
    x = _large_same_sign_fp16(6, 64, size)
    upstream = torch.full((6, 8), 1e-3, dtype=torch.float16)
    wrapped(x).backward(upstream)
    plain(x).backward(upstream)
    grad = wrapped[0].weight.grad
    assert torch.isfinite(grad).all() and torch.isfinite(plain[0].weight.grad).all()
    reference = upstream.double().t() @ x.double()  # (O, D), exact
    torch.testing.assert_close(grad.double(), reference, rtol=2e-3, atol=0)
    torch.testing.assert_close(grad, plain[0].weight.grad, rtol=2e-3, atol=0)


def test_fp16_z_keeps_its_bytes_and_round_trips():
    size = 16
    x = _large_same_sign_fp16(4, 64, size)
    v = torch.full((size, 1), 0.25)
    z = compress(x, v)
    assert z.dtype == torch.float16 and z.shape == (4, 4, 1) and torch.isfinite(z).all()
    torch.testing.assert_close(reconstruct(z, v, 64).double(), x.double(), rtol=1e-3, atol=0)


# ---- the same cases through peft adapters and the fused LoRA node ------------------------------------------


def _peft_lora(dtype: torch.dtype, fuse: bool, seed=0, **velora_overrides) -> nn.Module:
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(mlp(seed=seed), config).to(dtype)
    options = dict(sub_token_size=16, target_modules=["0", "2"], mode="adapter", fuse_lora=fuse)
    options.update(velora_overrides)
    return velora.apply_velora(model, velora.VeLoRAConfig(**options))


def _ran_fused(model: nn.Module, x: torch.Tensor) -> bool:
    return type(model.base_model.model[0](x).grad_fn).__name__ == "LoRAVeLoRAFunctionBackward"


@pytest.mark.parametrize("fuse", [True, False])
def test_peft_adapter_zero_tokens_then_first_batch_equals_fresh(fuse):
    model, fresh = _peft_lora(torch.float32, fuse), _peft_lora(torch.float32, fuse)
    empty = torch.zeros(0, 64, requires_grad=True)
    assert _ran_fused(model, empty) == fuse
    out = model(empty)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    x = torch.randn(5, 64) + 1
    assert_equal_dicts(step(model, x), step(fresh, x))


@pytest.mark.parametrize("fuse", [True, False])
def test_peft_adapter_double_backward_through_lora_weights_is_refused(fuse):
    model = _peft_lora(torch.float64, fuse)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    assert _ran_fused(model, x) == fuse
    lora_a = model.base_model.model[0].lora_A["default"].weight
    (grad_a,) = torch.autograd.grad(model(x).pow(2).sum(), lora_a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through a VeLoRA layer's weight gradient"):
        torch.autograd.grad(grad_a.pow(2).sum(), x)


@pytest.mark.parametrize("fuse", [True, False])
def test_peft_adapter_input_gradient_penalty_equals_unfused_path(fuse):
    """d/dθ |dL/dx|^2 through the adapter: the fused node's exact input gradient differentiates like peft's graph."""
    reference, model = _peft_lora(torch.float64, False), _peft_lora(torch.float64, fuse)
    x = torch.randn(5, 64, dtype=torch.float64)
    results = []
    for net in (reference, model):
        inputs = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(torch.tanh(net(inputs)).pow(3).sum(), inputs, create_graph=True)
        grad_x.pow(2).sum().backward()
        results.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    for name, expected in results[0].items():
        torch.testing.assert_close(results[1][name], expected, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("fuse", [True, False])
def test_peft_adapter_fp16_large_inputs_give_finite_adapter_grads(fuse):
    size = 16
    model = _peft_lora(torch.float16, fuse, init=torch.full((size,), 0.25))
    plain = _peft_lora(torch.float16, fuse, init=torch.full((size,), 0.25))
    velora.remove_velora(plain)
    x = _large_same_sign_fp16(6, 64, size, 17000, 20000)  # |z| = 4c > 65504 while the outputs stay finite
    assert _ran_fused(model, x) == fuse
    assert torch.isfinite(plain(x)).all()
    got = step(model, x)
    expected = step(plain, x)
    name = "base_model.model.0.lora_A.default.weight"
    assert torch.isfinite(got[name]).all() and torch.isfinite(expected[name]).all()
    torch.testing.assert_close(got[name], expected[name], rtol=5e-3, atol=1e-3)


# ---- zero-token batches on some ranks (MoE experts under DDP): no hang, v from the ranks that had tokens ----


_DDP_CASES = {"mean": dict(init="batch_average_once"), "mean_rank2": dict(init="batch_average_once", rank=2),
              "svd_rank2": dict(init="svd", rank=2), "ema": dict(init="ema", ema_decay=0.5),
              # re-estimated at every forward from the ranks' summed Gram matrices (a rank without tokens adds zeros)
              "svd_per_group_every_forward": dict(init="svd", rank=2, per_group_directions=True, reestimate_every=1),
              # coefficient_bits rounds z only: v and its synchronisation are the options' own (T = 0 included)
              "mean_rank_M_int8": dict(rank=16, coefficient_bits=8),
              "svd_per_group_every_forward_int4": dict(init="svd", rank=2, per_group_directions=True,
                                                       reestimate_every=1, coefficient_bits=4)}


def _ddp_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(3, 32, dtype=torch.float64, generator=generator) + shift for shift in (1.0, -2.0)]


def _capped_batches() -> list[torch.Tensor]:
    """Rank r's batch: 5 tokens of 32 features (10 sub-tokens of 16), rank-dependent and anisotropic."""
    generator = torch.Generator().manual_seed(11)
    scale = torch.linspace(3.0, 0.1, 16, dtype=torch.float64).repeat(2)  # (32,)
    return [torch.randn(5, 32, dtype=torch.float64, generator=generator) * scale + r for r in range(2)]


def _local_batch(step: int, rank: int) -> torch.Tensor:
    """Step 0: all empty; step 1: only rank 1 has tokens; step 2: only rank 0 has tokens."""
    batches = _ddp_batches()
    if (step, rank) == (1, 1):
        return batches[0]
    if (step, rank) == (2, 0):
        return batches[1]
    return torch.zeros(0, 32, dtype=torch.float64)


def _zero_token_ranks_worker(rank: int, world: int, out_dir: str) -> None:
    results = {}
    for case, options in _DDP_CASES.items():
        torch.manual_seed(0)
        model = velora.apply_velora(nn.Sequential(nn.Linear(32, 8, dtype=torch.float64)),
                                    velora.VeLoRAConfig(sub_token_size=16, target_modules="0", **options))
        for step_index in range(3):
            model(_local_batch(step_index, rank)).sum().backward()
            results[f"{case}.{step_index}.v"] = model[0].velora_v.clone()
            results[f"{case}.{step_index}.initialised"] = model[0].velora_initialised.clone()
    # more sub-tokens (shared) / tokens (per group) on each rank than svd_max_samples: each rank samples its own
    # batch as one process does, and the summed Gram matrices give every rank the same directions
    for case, options in {"capped.shared": {}, "capped.per_group": {"per_group_directions": True}}.items():
        torch.manual_seed(0)
        model = velora.apply_velora(nn.Sequential(nn.Linear(32, 8, dtype=torch.float64)), velora.VeLoRAConfig(
            sub_token_size=16, target_modules="0", init="svd", rank=2, svd_max_samples=3, **options))
        model(_capped_batches()[rank]).sum().backward()
        results[f"{case}.v"] = model[0].velora_v.clone()
    # NaN on rank 1 in a token the SVD's sampling skips (svd_max_samples=2 of 3 tokens / 6 sub-tokens): every rank
    # must raise the same one-line error, none may hang or build directions from the finite sample
    for case, options in {"nan.shared": {}, "nan.per_group": {"per_group_directions": True}}.items():
        torch.manual_seed(0)
        model = velora.apply_velora(nn.Sequential(nn.Linear(32, 8, dtype=torch.float64)), velora.VeLoRAConfig(
            sub_token_size=16, target_modules="0", init="svd", rank=2, svd_max_samples=2, **options))
        batch = _ddp_batches()[rank].clone()  # (3, 32): both ranks have tokens
        if rank == 1:
            batch[1, 3] = float("nan")  # token 1 / sub-token row 2: outside the strided sample (0, 2) / (0, 5)
        try:
            model(batch)
            results[case] = "no error"
        except ValueError as err:
            results[case] = str(err)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow  # in the session's 2-rank gloo spawn (tests/rank_results.py)
def test_nan_in_one_ranks_unsampled_tokens_stops_every_rank_with_one_error(tmp_path_factory):
    from rank_results import gloo_ranks

    seen = gloo_ranks(tmp_path_factory, __name__)
    for case in ("nan.shared", "nan.per_group"):
        first, second = (seen[rank][case] for rank in range(2))
        assert first == second and "NaN/Inf" in first and "\n" not in first, (case, first, second)


@pytest.mark.slow  # in the session's 2-rank gloo spawn (tests/rank_results.py)
def test_zero_token_batches_on_some_ranks_neither_hang_nor_skew_v(tmp_path_factory):
    from rank_results import gloo_ranks

    seen = gloo_ranks(tmp_path_factory, __name__)
    first, second = _ddp_batches()
    for case, options in _DDP_CASES.items():
        torch.manual_seed(0)
        alone = velora.apply_velora(nn.Sequential(nn.Linear(32, 8, dtype=torch.float64)),
                                    velora.VeLoRAConfig(sub_token_size=16, target_modules="0", **options))
        expected = [alone[0].velora_v.clone()]  # step 0: nobody had tokens, v untouched
        for batch in (first, second):  # one process that saw only the non-empty batches
            alone(batch)
            expected.append(alone[0].velora_v.clone())
        for step_index in range(3):
            for rank in range(2):
                assert bool(seen[rank][f"{case}.{step_index}.initialised"]) == (step_index > 0), (case, step_index)
                torch.testing.assert_close(seen[rank][f"{case}.{step_index}.v"], expected[step_index],
                                           rtol=1e-12, atol=1e-12, msg=f"{case} step {step_index} rank {rank}")


@pytest.mark.slow  # in the session's 2-rank gloo spawn (tests/rank_results.py)
def test_ranks_over_svd_max_samples_each_sample_their_own_batch_and_agree(tmp_path_factory):
    """docs/velora.md: above ``svd_max_samples`` each rank takes the strided sample one process would take of its
    own batch (sub-tokens for shared directions, tokens for per-group ones), and the directions are the top-r
    singular vectors of the ranks' samples stacked. Reference: that SVD, written out here."""
    from rank_results import gloo_ranks

    seen = gloo_ranks(tmp_path_factory, __name__)
    batches = _capped_batches()

    def strided(rows: torch.Tensor, cap: int) -> torch.Tensor:  # (N, ...) -> (cap, ...): evenly strided rows
        return rows[torch.linspace(0, rows.shape[0] - 1, cap).round().long()]

    def top(rows: torch.Tensor) -> torch.Tensor:  # (N, M) -> the (M, M) projector on the top-2 right singular vectors
        vh = torch.linalg.svd(rows, full_matrices=False).Vh[:2]  # (2, M)
        return vh.t() @ vh

    shared = torch.cat([strided(b.reshape(-1, 16), 3) for b in batches])  # (2 ranks x 3 sub-tokens, M)
    tokens = torch.cat([strided(b, 3) for b in batches]).view(6, 2, 16)  # (2 ranks x 3 tokens, G, M)
    expected = {"capped.shared": top(shared), "capped.per_group": torch.stack([top(tokens[:, g]) for g in range(2)])}
    for case, projector in expected.items():
        first, second = (seen[rank][f"{case}.v"] for rank in range(2))
        assert torch.equal(first, second), case  # every rank holds the same directions, bitwise
        got = first @ first.transpose(-1, -2)  # (..., M, M)
        torch.testing.assert_close(got, projector, rtol=0, atol=1e-10, msg=case)
        alone = torch.linalg.svd(torch.cat([b.reshape(-1, 16) for b in batches]), full_matrices=False).Vh[:2]
        if case == "capped.shared":  # the sample is not the whole batch: one process on both batches differs
            assert (got - alone.t() @ alone).abs().max() > 1e-3
