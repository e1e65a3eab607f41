"""Per-group directions (``per_group_directions``) and periodic re-estimation (``reestimate_every``) of VeLoRA's v:
the op against plain autograd on explicitly built per-group projections, the per-group estimates against their
definition, persistence, saved bytes, and a resumed run equal to an uninterrupted one bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from references import saved_activation_bytes
from torch import nn

from velora import VeLoRAConfig, apply_velora, load_velora_state
from velora.core.directions import estimate, group_means
from velora.core.functional import velora_linear
from velora.memory.meter import SavedActivationMeter

torch.set_num_threads(1)

D, O, M = 24, 5, 4  # in features, out features, sub-token size: G = 6 groups
G = D // M


def per_group_v(rank: int = 1, groups: int = G, size: int = M, seed: int = 0) -> torch.Tensor:
    raw = torch.randn(groups, size, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(raw)[0]  # (G, M, r), orthonormal columns per group


def projected_reference(x: torch.Tensor, v: torch.Tensor, in_features: int) -> torch.Tensor:
    """x̂: each sub-token of group g replaced by its projection on span(V_g), written group by group. (T, D)"""
    tokens = x.reshape(-1, in_features).double()  # (T, D)
    padded = F.pad(tokens, (0, v.shape[0] * v.shape[1] - in_features))  # (T, G·M)
    parts = []
    for index in range(v.shape[0]):
        chunk = padded[:, index * v.shape[1]:(index + 1) * v.shape[1]]  # (T, M)
        parts.append(chunk @ v[index].double() @ v[index].double().t())  # (T, M)
    return torch.cat(parts, dim=1)[:, :in_features]  # (T, D)


def reference_grads(x, weight, bias, v, grad_out):
    """Plain autograd: the weight sees x̂ (per-group projection), the input gradient is the exact G W."""
    x = x.detach().double().requires_grad_(True)
    weight, bias = weight.detach().double().requires_grad_(True), bias.detach().double().requires_grad_(True)
    x_hat = projected_reference(x.detach(), v, x.shape[-1]).view_as(x)  # (..., D)
    out = F.linear(x_hat, weight) + F.linear(x - x_hat, weight.detach()) + bias  # value F.linear(x, W, b)
    out.backward(grad_out.double())
    return out.detach(), x.grad, weight.grad, bias.grad


def velora_grads(x, weight, bias, v, grad_out):
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    out = velora_linear(x, weight, bias, v)
    out.backward(grad_out)
    return out.detach(), x.grad, weight.grad, bias.grad


# ---- the op ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_per_group_op_equals_plain_autograd_on_per_group_projections(rank, tokens):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, D, generator=generator, dtype=torch.float64)  # (T, D)
    weight, bias = torch.randn(O, D, generator=generator, dtype=torch.float64), torch.randn(O, dtype=torch.float64)
    grad_out = torch.randn(tokens, O, generator=generator, dtype=torch.float64)  # (T, O)
    v = per_group_v(rank)
    ours, reference = velora_grads(x, weight, bias, v, grad_out), reference_grads(x, weight, bias, v, grad_out)
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    if tokens:  # a shared v (group 0's for every group) gives another weight gradient: the groups really differ
        shared = velora_grads(x, weight, bias, v[0], grad_out)[2]
        assert not torch.allclose(shared, ours[2], rtol=1e-3, atol=1e-6)


def test_sub_tokens_in_span_of_their_groups_direction_give_the_exact_gradient():
    v = per_group_v(1)  # (G, M, 1)
    coeffs = torch.randn(9, G, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # (T, G)
    x = (coeffs.unsqueeze(-1) * v[:, :, 0]).reshape(9, D)  # (T, D): group g of each token on span(v_g)
    weight = torch.randn(O, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bias, grad_out = torch.zeros(O, dtype=torch.float64), torch.randn(9, O, dtype=torch.float64)
    plain = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    F.linear(*plain).backward(grad_out)
    _, grad_x, grad_w, grad_b = velora_grads(x, weight, bias, v, grad_out)
    for mine, exact in zip((grad_x, grad_w, grad_b), (p.grad for p in plain)):
        torch.testing.assert_close(mine, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tolerance", [
    (torch.float16, dict(rtol=2e-2, atol=2e-2)),
    (torch.bfloat16, dict(rtol=5e-2, atol=5e-2)),
    (torch.float32, dict(rtol=1e-5, atol=1e-5)),
])
def test_per_group_op_in_low_precision_matches_the_fp64_reference(dtype, tolerance):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, D, generator=generator).to(dtype)  # (B, N, D)
    weight, bias = torch.randn(O, D, generator=generator).to(dtype), torch.randn(O, generator=generator).to(dtype)
    grad_out = torch.randn(2, 5, O, generator=generator).to(dtype)
    v = per_group_v(2).float()
    out, grad_x, grad_w, grad_b = velora_grads(x, weight, bias, v, grad_out)
    assert out.dtype == grad_x.dtype == grad_w.dtype == grad_b.dtype == dtype
    reference = reference_grads(x, weight, bias, v.double(), grad_out)
    for mine, theirs in zip((out, grad_x, grad_w, grad_b), reference):
        torch.testing.assert_close(mine.double(), theirs, **tolerance)


def test_wrong_number_of_groups_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"need 6 groups .*pass \(6, M, r\)"):
        velora_linear(torch.randn(2, D), torch.randn(O, D), None, per_group_v(1, groups=5).float())


# ---- the layer: per-group estimates from the first batch ---------------------------------------------------


def layer(dtype=torch.float64, in_features=D, **config) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, O)).to(dtype)
    return apply_velora(model, VeLoRAConfig(**{"sub_token_size": M, "target_modules": ["0"],
                                               "per_group_directions": True, **config}))


def batch(dtype=torch.float64, tokens=10, in_features=D, seed=5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) + 0.5).to(dtype)  # (T, D)


def test_first_batch_gives_each_group_its_normalised_mean_sub_token():
    model, x = layer(), batch()
    model(x).sum().backward()
    v = model[0].velora_v  # (G, M, 1)
    assert v.shape == (G, M, 1)
    expected = x.view(10, G, M).mean(0)  # (G, M), each group's mean sub-token
    torch.testing.assert_close(v[:, :, 0], expected / expected.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-12)


def test_svd_init_per_group_takes_each_groups_top_singular_vectors():
    model, x = layer(init="svd", rank=2), batch()
    model(x).sum().backward()
    for index in range(G):
        rows = x.view(10, G, M)[:, index]  # (T, M), group index's sub-tokens
        top = torch.linalg.svd(rows, full_matrices=False)[2][:2].t()  # (M, 2)
        torch.testing.assert_close(model[0].velora_v[index].abs(), top.abs(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("degenerate", [None, "zero group", "rank-1 group"])
def test_per_group_svd_in_one_batched_call_equals_the_one_group_rule_per_group(dtype, degenerate):
    from velora.core.subtoken import initial_directions

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 4 * 8, generator=generator, dtype=torch.float64)  # (B, T, D), G = 4 groups of M = 8
    if degenerate == "zero group":
        x[..., 8:16] = 0  # group 1 spans nothing: its basis is completed (the per-group fallback)
    if degenerate == "rank-1 group":
        x[..., 16:24] = x[..., 16:17] * torch.arange(1.0, 9.0, dtype=torch.float64)  # group 2 spans one direction
    x = x.to(dtype)
    got = estimate(x, 8, 3, "svd", per_group=True, max_samples=12)  # 18 sub-tokens per group, strided to 12
    rows = x.reshape(-1, 4, 8).transpose(0, 1)  # (G, T, M)
    expected = torch.stack([initial_directions(rows[g], 8, 3, "svd", max_samples=12) for g in range(4)])
    assert got.shape == (4, 8, 3) and torch.equal(got, expected)


@pytest.mark.parametrize("degenerate", ["none", "zero group", "rank-1 group"])
def test_top_eigenvectors_of_the_gram_matrix_are_the_batched_svd_directions(degenerate):
    # the DDP route (Gram matrices summed over ranks) must give the directions one process's SVD gives
    from velora.core.directions import top_eigenvectors

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(40, 4 * 8, generator=generator, dtype=torch.float64)  # (T, D), G = 4 groups of M = 8
    if degenerate == "zero group":
        x[:, 8:16] = 0
    if degenerate == "rank-1 group":
        x[:, 16:24] = x[:, 16:17] * torch.arange(1.0, 9.0, dtype=torch.float64)
    groups = x.reshape(40, 4, 8)  # (T, G, M)
    expected = estimate(x, 8, 3, "svd", per_group=True, max_samples=4096)  # (G, M, 3)
    got = top_eigenvectors(torch.einsum("tgm,tgk->gmk", groups, groups), 3)  # (G, M, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    shared = top_eigenvectors(groups.reshape(-1, 8).t() @ groups.reshape(-1, 8), 3)  # (M, 3)
    torch.testing.assert_close(shared, estimate(x, 8, 3, "svd", per_group=False, max_samples=4096), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="contains NaN/Inf"):
        top_eigenvectors(torch.full((8, 8), float("nan"), dtype=torch.float64), 2)


@pytest.mark.parametrize("per_group", [False, True])
@pytest.mark.parametrize("case", ["huge", "nearly rank-1"])
def test_the_ranks_gram_route_spans_what_one_process_svd_spans(case, per_group):
    # fp32 inputs near 1e19 overflowed an fp32 Gram matrix (a false NaN/Inf error), and a second direction at 1e-3
    # of the first fell under an fp32 eigenvalue floor (replaced by a basis vector); float64 Gram matrices keep both
    from velora.core.config import VeLoRAConfig
    from velora.core.directions import _pooled_svd

    generator = torch.Generator().manual_seed(5)
    if case == "huge":
        x = torch.randn(40, 32, generator=generator) * 1e19  # (T, D) fp32
    else:
        a, b = torch.randn(40, 1, generator=generator), torch.randn(40, 1, generator=generator)  # (T, 1)
        u, w = torch.randn(1, 32, generator=generator), torch.randn(1, 32, generator=generator)  # (1, D)
        x = (a @ u + 1e-3 * b @ w).float()  # (T, D): rank 2, the second direction at 1e-3
    config = VeLoRAConfig(sub_token_size=8, target_modules="0", init="svd", rank=2, per_group_directions=per_group)
    got = _pooled_svd(x, config, 8)  # one process: the rank sum is the identity
    expected = estimate(x, 8, 2, "svd", per_group=per_group, max_samples=config.svd_max_samples)
    assert got.dtype == expected.dtype == torch.float32
    projector = got.double() @ got.double().transpose(-1, -2)  # (..., M, M)
    torch.testing.assert_close(projector, expected.double() @ expected.double().transpose(-1, -2), rtol=0, atol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_per_group_svd_of_a_batch_holding_nan_or_inf_is_a_one_line_error(bad):
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    x[0, 0, 3] = bad
    with pytest.raises(ValueError, match="contains NaN/Inf"):
        estimate(x, 8, 2, "svd", per_group=True, max_samples=64)


def test_padding_per_group_builds_the_padded_last_group_from_its_real_features():
    model, x = layer(in_features=22, pad=True), batch(in_features=22)  # G = 6, last group 2 real features
    model(x).sum().backward()
    last = model[0].velora_v[-1, :, 0]  # (M,)
    mean = x[:, 20:].mean(0)  # (2,)
    torch.testing.assert_close(last, torch.cat([mean / mean.norm(), torch.zeros(2, dtype=torch.float64)]))
    weight, bias = model[0].weight, model[0].bias
    grad_out = torch.ones(10, O, dtype=torch.float64)
    reference = reference_grads(x, weight, bias, model[0].velora_v, grad_out)[2]
    model.zero_grad()
    model(x).backward(grad_out)
    torch.testing.assert_close(model[0].weight.grad, reference, rtol=1e-12, atol=1e-12)


def test_random_per_group_draws_an_independent_seeded_direction_per_group():
    first, second = layer(init="random", seed=3), layer(init="random", seed=3)
    v = first[0].velora_v  # (G, M, 1), set at apply time
    assert torch.equal(v, second[0].velora_v) and not torch.allclose(v[0], v[1])
    torch.testing.assert_close(v.transpose(1, 2) @ v, torch.ones(G, 1, 1, dtype=v.dtype))


def test_a_given_direction_tensor_starts_every_group_from_it():
    given = torch.tensor([1.0, 2.0, 0.0, -2.0])  # (M,)
    v = layer(init=given)[0].velora_v  # (G, M, 1), set at apply time
    assert v.shape == (G, M, 1)
    torch.testing.assert_close(v, (given / 3).double().view(1, M, 1).expand(G, M, 1))
    with pytest.raises(ValueError, match=r"does not fit '0' \(expects \(4,\) or \(4, 1\)\)"):
        layer(init=torch.ones(5))


def test_estimate_per_group_equals_the_shared_estimate_on_each_group_alone():
    x = batch()
    x[:, M:2 * M] = torch.randn(M, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(5).unsqueeze(1)  # ±u
    for rank, strategy in ((1, "batch_average_once"), (2, "batch_average_once"), (2, "svd")):
        per_group = estimate(x, M, rank, strategy, per_group=True, max_samples=4096)  # (G, M, r)
        for index in range(G):  # group 1 has zero mean: it falls back to its top singular vector (±u)
            alone = estimate(x[:, index * M:(index + 1) * M], M, rank, strategy, per_group=False, max_samples=4096)
            torch.testing.assert_close(per_group[index], alone, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(group_means(x, M, True).mean(0), group_means(x, M, False), rtol=1e-12, atol=1e-12)


def test_zero_token_first_batch_leaves_v_unset_and_the_next_batch_sets_it():
    model = layer()
    model(torch.zeros(0, D, dtype=torch.float64)).sum().backward()
    assert not model[0].velora_ready
    model(batch()).sum().backward()
    assert model[0].velora_ready and model[0].velora_v.shape == (G, M, 1)


# ---- saved bytes, persistence, config ----------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3])
def test_per_group_saves_the_same_bytes_as_shared_z_alone(rank):
    x = batch(torch.float32, tokens=16).requires_grad_(True)
    counted = {}
    for per_group in (False, True):
        model = layer(torch.float32, rank=rank, per_group_directions=per_group)
        model(x).sum()  # v built on this first call
        counted[per_group] = saved_activation_bytes(model, lambda m=model: m(x).sum())
    assert counted[True] == counted[False] == 16 * G * rank * 4  # z (T, G, r) in fp32; v is a buffer
    with SavedActivationMeter(model) as meter:  # the library's meter counts the same bytes
        loss = model(x).sum()  # kept alive past the block: the meter counts what backward still needs
    assert meter.total_bytes == 16 * G * rank * 4
    loss.backward()


def test_ema_per_group_moves_each_groups_direction_with_its_own_running_mean():
    model, data = layer(init="ema", ema_decay=0.5), batches(3)
    running = None
    for x in data:
        model(x).sum().backward()
        mean = x.view(-1, G, M).mean(0)  # (G, M)
        running = mean if running is None else 0.5 * running + 0.5 * mean
    torch.testing.assert_close(model[0].velora_running_mean, running, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].velora_v[:, :, 0], running / running.norm(dim=1, keepdim=True),
                               rtol=1e-12, atol=1e-12)


def test_per_group_v_survives_a_state_dict_and_load_velora_state(tmp_path):
    model = layer(rank=2)
    model(batch()).sum().backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = layer(rank=2)
    load_velora_state(fresh, state)
    assert fresh[0].velora_ready and torch.equal(fresh[0].velora_v, model[0].velora_v)
    shared = apply_velora(nn.Sequential(nn.Linear(D, O)).double(),
                          VeLoRAConfig(sub_token_size=M, rank=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"shape \(6, 4, 2\) .*per_group_directions"):
        load_velora_state(shared, state)


def test_config_round_trips_and_rejects_bad_values():
    config = VeLoRAConfig(per_group_directions=True, reestimate_every=5, init="svd")
    assert VeLoRAConfig.from_json(config.to_json()) == config
    assert config.to_dict()["per_group_directions"] is True and config.to_dict()["reestimate_every"] == 5
    with pytest.raises(ValueError, match="per_group_directions='yes' must be True or False"):
        VeLoRAConfig(per_group_directions="yes")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"reestimate_every={bad!r} must be a positive integer"):
            VeLoRAConfig(reestimate_every=bad)
    for init in ("ema", "random", torch.ones(32)):
        with pytest.raises(ValueError, match="does not build v from data that way"):
            VeLoRAConfig(reestimate_every=3, init=init)


# ---- diagnose, fused LoRA (fp32/bf16, 4-bit) ---------------------------------------------------------------


def on_group_directions(tokens: int, seed: int = 6) -> torch.Tensor:
    """(T, D) whose group g of every token is a multiple of one group-specific vector u_g (not shared)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(G, M, generator=generator, dtype=torch.float64) + 0.1  # (G, M), u_g
    coeffs = torch.rand(tokens, G, generator=generator, dtype=torch.float64) + 0.5  # (T, G), positive
    return (coeffs.unsqueeze(-1) * directions).reshape(tokens, D)  # (T, D)


def test_diagnose_per_group_is_exact_on_per_group_spans_where_shared_is_not():
    import velora

    x = on_group_directions(12)
    target = torch.randn(12, O, dtype=torch.float64)
    rows = {}
    for per_group in (True, False):
        model = layer(per_group_directions=per_group)
        model(x).sum().backward()  # v from this batch: per group, each u_g exactly
        rows[per_group] = velora.diagnose(model, x, loss_fn=lambda m, b: F.mse_loss(m(b), target)).layers[0]
    assert rows[True].energy == pytest.approx(1.0, abs=1e-12)
    assert rows[True].cosine == pytest.approx(1.0, abs=1e-12)
    assert rows[False].energy < 0.9 and rows[False].cosine < 0.99
    assert rows[True].z_bytes == rows[False].z_bytes  # same saved bytes


def fused_lora(dtype, quantised: bool, per_group: bool, fuse: bool):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, O)).to(dtype)
    if quantised:
        bnb = pytest.importorskip("bitsandbytes")
        base = bnb.nn.Linear4bit(D, O, compute_dtype=dtype, quant_type="nf4")
        base.load_state_dict(model[0].state_dict())
        base.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        model[0] = base.to("cpu")
        model.is_loaded_in_4bit = True
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
    return apply_velora(model, VeLoRAConfig(sub_token_size=M, target_modules=["0"], mode="adapter",
                                            per_group_directions=per_group, fuse_lora=fuse))


@pytest.mark.parametrize("dtype,quantised,tolerance", [
    (torch.float32, False, dict(rtol=1e-5, atol=1e-6)),
    (torch.bfloat16, False, dict(rtol=2e-2, atol=2e-2)),
    (torch.float32, True, dict(rtol=1e-5, atol=1e-6)),
], ids=["fp32", "bf16", "nf4"])
def test_fused_lora_node_with_per_group_v_equals_peft_path_and_is_exact_on_group_spans(dtype, quantised, tolerance):
    x = on_group_directions(7).to(dtype)
    results = {}
    for per_group, fuse in ((True, True), (True, False), (False, True)):
        model = fused_lora(dtype, quantised, per_group, fuse)
        out = model(x)  # builds v from x
        assert (type(out.grad_fn).__name__ == "LoRAVeLoRAFunctionBackward") == fuse  # the fused node really ran
        out.sum().backward()
        model.zero_grad()
        model(x).pow(2).sum().backward()
        lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
        assert lora_a.velora_v.shape == ((G, M, 1) if per_group else (M, 1))
        results[per_group, fuse] = lora_a.weight.grad.clone()
    torch.testing.assert_close(results[True, True], results[True, False], **tolerance)
    # x's groups lie on per-group spans: the per-group A gradient is the exact one, which shared v misses; the
    # exact reference is the unfused peft path with VeLoRA off (remove_velora)
    from velora import remove_velora

    exact_model = remove_velora(fused_lora(dtype, quantised, True, False))
    exact_model(x).pow(2).sum().backward()
    exact = next(m for n, m in exact_model.named_modules() if n.endswith("lora_A.default")).weight.grad
    torch.testing.assert_close(results[True, True], exact, **tolerance)
    assert not torch.allclose(results[False, True].float(), exact.float(), rtol=0.05, atol=1e-3)


# ---- re-estimation every K training forwards -------------------------------------------------------------------


def batches(count: int, tokens: int = 8, seed: int = 9) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, D, generator=generator, dtype=torch.float64) + index * 0.3
            for index in range(count)]  # (T, D) each, means drifting so every estimate differs


@pytest.mark.parametrize("init,per_group", [("batch_average_once", False), ("svd", True)])
def test_reestimate_every_k_forwards_takes_v_from_that_forwards_batch(init, per_group):
    model, data = layer(init=init, rank=2, reestimate_every=2, per_group_directions=per_group), batches(5)
    expected = None
    for index, x in enumerate(data):
        model(x).sum().backward()
        if index % 2 == 0:  # forwards 0 (first batch), 2, 4
            expected = estimate(x, M, 2, init, per_group=per_group, max_samples=4096)
        assert torch.equal(model[0].velora_v, expected.to(model[0].velora_v)), index
        assert int(model[0].velora_step) == index + 1


def test_reestimate_is_out_of_place_and_a_pending_backward_uses_the_v_it_saved():
    model, (first, second, third) = layer(reestimate_every=2), batches(3)
    model(first).sum().backward()
    pending = model(second).sum()  # forward 1 saves z and v for its backward
    v_saved = model[0].velora_v
    copy = v_saved.clone()
    model(third).sum()  # forward 2 re-estimates v
    assert model[0].velora_v is not v_saved and torch.equal(v_saved, copy)  # the old tensor was not touched
    assert not torch.equal(model[0].velora_v, copy)
    model.zero_grad()
    pending.backward()
    grad_out = torch.ones(8, O, dtype=torch.float64)
    reference = reference_grads(second, model[0].weight, model[0].bias, copy, grad_out)[2]
    torch.testing.assert_close(model[0].weight.grad, reference, rtol=1e-12, atol=1e-12)


def test_under_gradient_accumulation_k_times_a_re_estimates_on_micro_batch_zero():
    micro_batches, steps = 2, 5
    model, data = layer(reestimate_every=2 * micro_batches), batches(steps * micro_batches)  # every 2nd step
    for step in range(steps):
        for micro in range(micro_batches):
            model(data[step * micro_batches + micro]).sum().backward()
        source = data[(step - step % 2) * micro_batches]  # micro-batch 0 of steps 0, 2, 4
        expected = estimate(source, M, 1, "batch_average_once", per_group=True, max_samples=4096,
                            mean=group_means(source, M, True))  # the layer's mean: all groups in one sum
        assert torch.equal(model[0].velora_v, expected), step


def test_checkpoint_recompute_and_zero_token_batches_do_not_move_v_out_of_turn():
    from torch.utils.checkpoint import checkpoint

    model, data = layer(reestimate_every=2), batches(3)
    for x in data[:2]:
        checkpoint(model, x, use_reentrant=False).sum().backward()  # the recompute in backward is no forward
    assert int(model[0].velora_step) == 2
    v = model[0].velora_v
    model(torch.zeros(0, D, dtype=torch.float64)).sum().backward()  # due now, but no tokens: v stays
    assert torch.equal(model[0].velora_v, v) and int(model[0].velora_step) == 3


def train_steps(model, optimizer, data):
    for x in data:
        optimizer.zero_grad(set_to_none=True)
        torch.tanh(model(x)).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("config", [dict(reestimate_every=4, per_group_directions=False), dict(reestimate_every=4),
                                    dict(reestimate_every=1, per_group_directions=True, init="svd", rank=2)],
                         ids=["shared", "per-group", "per-group-svd-every-forward"])
def test_resumed_run_equals_the_uninterrupted_one_bitwise(config):
    data = batches(8)
    straight = layer(**config)
    train_steps(straight, torch.optim.AdamW(straight.parameters(), lr=1e-2), data)

    first = layer(**config)
    optimizer = torch.optim.AdamW(first.parameters(), lr=1e-2)
    train_steps(first, optimizer, data[:3])
    model_state, optimizer_state = first.state_dict(), optimizer.state_dict()
    resumed = layer(**config)
    resumed.load_state_dict(model_state)
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    optimizer.load_state_dict(optimizer_state)
    train_steps(resumed, optimizer, data[3:])
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key

    # control: without the saved counter the next re-estimate falls on another batch (or, re-estimating every
    # forward, the first forward after the load keeps the loaded v) and the runs part
    restarted = layer(**config)
    restarted.load_state_dict({k: v for k, v in model_state.items() if not k.endswith("velora_step")}, strict=False)
    optimizer = torch.optim.AdamW(restarted.parameters(), lr=1e-2)
    optimizer.load_state_dict(optimizer_state)
    train_steps(restarted, optimizer, data[3:])
    assert not torch.equal(restarted[0].weight, straight[0].weight)


def test_load_velora_state_restores_the_counter_and_refuses_a_file_without_it():
    model = layer(reestimate_every=3)
    for x in batches(2):
        model(x).sum().backward()
    fresh = layer(reestimate_every=3)
    load_velora_state(fresh, model.state_dict())
    assert int(fresh[0].velora_step) == 2 and torch.equal(fresh[0].velora_v, model[0].velora_v)
    fresh(batches(1)[0]).sum()  # forward 2: not due yet (due at 3), v unchanged
    assert torch.equal(fresh[0].velora_v, model[0].velora_v)
    fresh[0].reset_velora_state()  # back to apply time: the count restarts with the next first batch
    assert int(fresh[0].velora_step) == 0 and not fresh[0].velora_ready
    data = batches(3, seed=12)
    for x in data:
        fresh(x).sum()
    assert int(fresh[0].velora_step) == 3
    assert torch.equal(fresh[0].velora_v, estimate(data[0], M, 1, "batch_average_once", per_group=True,
                                                   max_samples=4096, mean=group_means(data[0], M, True)))
    plain = layer()
    plain(batches(1)[0]).sum()
    with pytest.raises(ValueError, match="holds no velora_step"):
        load_velora_state(layer(reestimate_every=3), plain.state_dict())


# ---- svd: which sub-tokens it sees ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_group", [False, True])
def test_svd_init_uses_every_sub_token_up_to_svd_max_samples_then_an_even_stride(per_group):
    x = batch(tokens=20)  # 20 tokens x 6 groups = 120 sub-tokens (20 per group)
    rows = x.view(20, G, M)  # (T, G, M)
    pools = [rows[:, index] for index in range(G)] if per_group else [rows.reshape(-1, M)]  # (N, M) each

    def top(pool: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(pool, full_matrices=False)[2][:2].t().abs()  # (M, 2)

    for cap in (4096, 7):
        model = layer(init="svd", rank=2, svd_max_samples=cap, per_group_directions=per_group)
        model(x).sum()
        v = model[0].velora_v if per_group else model[0].velora_v.unsqueeze(0)  # (G or 1, M, 2)
        for directions, pool in zip(v, pools):
            if cap < pool.shape[0]:  # evenly strided, deterministic
                pool = pool[torch.linspace(0, pool.shape[0] - 1, cap).round().long()]
            torch.testing.assert_close(directions.abs(), top(pool), rtol=1e-10, atol=1e-10)
    strided = pools[0][torch.linspace(0, pools[0].shape[0] - 1, 7).round().long()]  # (7, M)
    assert not torch.allclose(top(pools[0]), top(strided), rtol=1e-3, atol=1e-3)  # the cap matters here


def test_init_from_a_run_without_the_counter_takes_v_and_counts_re_estimates_anew():
    from velora.training.init_from import InitSource, restore_init_velora

    source = layer()
    source(batches(1)[0]).sum()
    buffers = {key.rpartition(".")[2]: value for key, value in source.state_dict().items() if "velora" in key}
    target = layer(reestimate_every=2)
    summary = restore_init_velora(target, InitSource("run", "velora run", 2, {}, {"0": buffers}))
    assert "v of 1/1 VeLoRA layers" in summary
    assert torch.equal(target[0].velora_v, source[0].velora_v) and int(target[0].velora_step) == 0
    data = batches(3, seed=11)
    for x in data:
        target(x).sum()
    expected = estimate(data[2], M, 1, "batch_average_once", per_group=True, max_samples=4096,
                        mean=group_means(data[2], M, True))
    assert torch.equal(target[0].velora_v, expected)  # the count restarted: forward 2 re-estimated
