"""VeLoRAConfig.coefficient_bits: z kept as 8- or 4-bit integers with one scale per token, after one scale per
coefficient column (``coefficient_scales="token_and_column"``, the default) or not (``"token"``).

Checked against an independent quantiser written out here, LLM-like outlier channels, plain autograd on the
rounded x̂, the saved bytes counted by storage, the fused peft path, fp16 inputs whose z needs the storage shift,
NaN that must not turn into a finite gradient, the diagnostic, and the config's validation and JSON (resume:
test_train's bitwise resume cases)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from references import saved_activation_bytes
from torch import nn

import velora
from velora import VeLoRAConfig, apply_velora
from velora.core.subtoken import compress, dequantise_coefficients, quantise_coefficients, reconstruct

torch.set_num_threads(1)


def reference_columns(z: torch.Tensor) -> torch.Tensor:
    """(T, n) float64 -> (n,): each column's sqrt(mean over tokens of z²), 1 where that is 0 or not finite."""
    out = torch.ones(z.shape[1], dtype=torch.float64)
    for j in range(z.shape[1]):
        rms = math.sqrt(sum(float(v) ** 2 for v in z[:, j]) / z.shape[0]) if z.shape[0] else 0.0
        out[j] = rms if math.isfinite(rms) and rms > 0 else 1.0
    return out


def reference_round_trip(z: torch.Tensor, bits: int, columns: bool = True) -> torch.Tensor:
    """In float64, z (T, n): y = z / c (c: ``reference_columns``, or 1 without columns), then token by token
    s = max|y_t| / (2^(bits-1) - 1) and ẑ_t = s · round(y_t / s) · c (0 for an all-zero token)."""
    top = 2 ** (bits - 1) - 1
    z = z.double()
    c = reference_columns(z) if columns else torch.ones(z.shape[1], dtype=torch.float64)
    out = torch.empty(z.shape, dtype=torch.float64)
    for t, row in enumerate(z / c):
        step = float(row.abs().max()) / top if row.numel() else 0.0
        out[t] = torch.zeros_like(row) if step == 0 else torch.round(row / step) * step * c
    return out


@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_round_trip_equals_an_independent_quantiser(bits, dtype, columns):
    generator = torch.Generator().manual_seed(bits)
    z = (torch.randn(6, 3, 3, generator=generator, dtype=torch.float64) * 3).to(dtype)  # (T, G, r): G·r = 9, odd
    z[1] = 0  # an all-zero token
    z[2, 0, 0] = 40.0  # one token with an outlier: its other coefficients get a coarse step
    z[:, 1, 2] *= 30  # one column large on every token
    kept = quantise_coefficients(z, bits, columns)
    assert kept.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert kept.codes.shape == (6, 9 if bits == 8 else 5) and kept.scales.shape == (6, 1)  # 4 bits: 2 codes a byte
    assert (kept.columns.shape == (1, 9)) if columns else kept.columns is None
    got = dequantise_coefficients(kept, bits, z.shape, dtype)
    assert got.dtype == dtype and got.shape == z.shape
    expected = reference_round_trip(z.reshape(6, 9), bits, columns).view(z.shape)  # float64
    eps = torch.finfo(dtype).eps  # the same codes; the scales and the cast to dtype differ by rounding only
    torch.testing.assert_close(got.double(), expected, rtol=4 * eps, atol=0)
    c = reference_columns(z.double().reshape(6, 9)) if columns else torch.ones(9, dtype=torch.float64)
    step = (z.double().reshape(6, 9) / c).abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1) * c  # (T, n)
    error = (got.double() - z.double()).reshape(6, 9).abs()  # (T, n)
    assert (error <= step / 2 + z.double().abs().amax() * 4 * eps).all()


def test_column_scales_read_evenly_spaced_tokens_of_a_long_batch_and_the_round_trip_holds():
    """T = 3000 > 1024: the column RMS comes from every 3rd token (1000 of them); every coefficient still rounds
    within half its step, the step set by those column scales and its token's scale."""
    generator = torch.Generator().manual_seed(5)
    column_size = torch.tensor([1.0, 50.0], dtype=torch.float64).repeat(4).view(1, 4, 2)  # every other column 50x
    z = torch.randn(3000, 4, 2, generator=generator, dtype=torch.float64) * column_size  # (T, G, r)
    kept = quantise_coefficients(z, 8)
    expected = reference_columns(z.reshape(3000, 8)[::3])  # (8,)
    torch.testing.assert_close(kept.columns.view(8), expected, rtol=1e-12, atol=0)
    got = dequantise_coefficients(kept, 8, z.shape, z.dtype).reshape(3000, 8)
    y = z.reshape(3000, 8) / expected  # (T, n)
    step = y.abs().amax(1, keepdim=True) / 127 * expected  # (T, n)
    assert ((got - z.reshape(3000, 8)).abs() <= step / 2 + 1e-9).all()


@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_zero_tokens_and_one_coefficient(bits, columns):
    for shape in ((0, 3, 2), (1, 1, 1)):
        z = torch.full(shape, -2.5)
        kept = quantise_coefficients(z, bits, columns)
        assert kept.codes.shape[0] == shape[0] and kept.scales.shape == (shape[0], 1)
        torch.testing.assert_close(dequantise_coefficients(kept, bits, z.shape, z.dtype), z)


@pytest.mark.parametrize("columns", [True, False])
def test_a_token_with_nan_or_inf_dequantises_to_nan_not_to_a_finite_number(columns):
    z = torch.randn(3, 2, 2)
    z[0, 1, 0], z[2, 0, 1] = float("nan"), float("inf")
    for bits in (8, 4):
        got = dequantise_coefficients(quantise_coefficients(z, bits, columns), bits, z.shape, z.dtype)
        assert got[0].isnan().all() and got[2].isnan().all()  # the whole token: its scale is NaN
        assert torch.isfinite(got[1]).all()  # the NaN/Inf columns fall back to scale 1: the other tokens stay
        torch.testing.assert_close(got[1], z[1], rtol=0, atol=float(z[1].abs().max()) / 2 ** (bits - 1))


@pytest.mark.parametrize("bits", [8, 4])
def test_outlier_channels_on_every_token_leave_the_other_columns_step_fine(bits):
    """Six input features 100x the rest on every token (LLM outlier channels): with per-column scales (the default)
    the weight gradient's other columns lose what Gaussian inputs lose; with one scale per token alone their step
    is ~100x coarser (8 bits: about a third of their norm; 4 bits: everything)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=generator, dtype=torch.float64)  # (T, D)
    outliers = torch.randperm(256, generator=generator)[:6]
    typical = torch.ones(256, dtype=torch.bool)
    typical[outliers] = False
    grad = torch.randn(1024, 32, generator=generator, dtype=torch.float64)  # (T, O)
    errors = {}
    for inputs in ("gaussian", "outliers"):
        features = x.clone()
        if inputs == "outliers":
            features[:, outliers] *= 100
        exact = grad.t() @ features  # (O, D)
        for scales in ("token_and_column", "token"):
            torch.manual_seed(0)
            model = apply_velora(nn.Sequential(nn.Linear(256, 32, bias=False, dtype=torch.float64)), VeLoRAConfig(
                sub_token_size=4, rank=4, coefficient_bits=bits, coefficient_scales=scales, target_modules="0"))
            model(features)  # the first batch builds the directions
            model(features).backward(grad)
            column_error = (model[0].weight.grad - exact).norm(dim=0) / exact.norm(dim=0)  # (D,)
            errors[inputs, scales] = float(column_error[typical].median())
            if inputs == "outliers":  # the diagnostic's column error sees it; its cosine, ruled by the outliers, not
                report = velora.diagnose(model, features, loss_fn=lambda m, b, g=grad: (m(b) * g).sum())
                (row,) = report.layers
                assert row.cosine > 0.98
                assert row.column_error == pytest.approx(float(column_error.median()), rel=0.05)
    gaussian = errors["gaussian", "token_and_column"]
    assert gaussian < (0.02 if bits == 8 else 0.2)
    assert errors["outliers", "token_and_column"] < 1.5 * gaussian
    assert errors["outliers", "token"] > 0.25  # 8 bits: ~0.34 (40x Gaussian's); 4 bits: 1.0, every step rounds to 0


# ---- the op ----------------------------------------------------------------------------------------------


def _layer(bits, size=4, rank=4, dtype=torch.float64, init="batch_average_once", seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 5, dtype=dtype))
    return apply_velora(model, VeLoRAConfig(sub_token_size=size, rank=rank, init=init, target_modules="0",
                                            coefficient_bits=bits))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rank", [1, 4])
def test_weight_gradient_is_plain_autograd_on_the_rounded_reconstruction(bits, rank):
    model = _layer(bits, rank=rank)
    layer = model[0]
    model(torch.randn(2, 3, 16, dtype=torch.float64)).sum().backward()  # first batch builds v
    layer.zero_grad()
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 5, dtype=torch.float64)
    F.mse_loss(torch.tanh(model(x)), target).backward()
    # reference: the plain layer on x for the output and input gradient, on the rounded x̂ for the weight gradient
    v = layer.velora_v
    z = compress(x.detach(), v)  # (T, G, r)
    x_hat = reconstruct(reference_round_trip(z.view(6, -1), bits).view(z.shape), v, 16).view(2, 3, 16)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = F.linear(x_ref, w, b)  # (2, 3, 5)
    grad_out, = torch.autograd.grad(F.mse_loss(torch.tanh(out), target), out)
    out.backward(grad_out)
    expected_w = grad_out.reshape(6, 5).t() @ x_hat.reshape(6, 16)  # (O, D)
    torch.testing.assert_close(layer.weight.grad, expected_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)  # exact, not rounded
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-12, atol=1e-12)
    if rank == 4 and bits == 8:  # rank = M keeps every sub-token: only rounding is lost
        cosine = F.cosine_similarity(layer.weight.grad.flatten(), w.grad.flatten(), dim=0)
        assert 0.999 < cosine < 1.0


def test_nan_in_one_token_gives_a_nan_weight_gradient_not_a_finite_one():
    model = _layer(8, dtype=torch.float32)
    model(torch.randn(4, 16)).sum().backward()
    model.zero_grad()
    x = torch.randn(4, 16)
    x[2, 5] = float("nan")
    model(x).sum().backward()
    assert model[0].weight.grad.isnan().any()


@pytest.mark.parametrize(("bits", "scales"), [(None, "token_and_column"), (8, "token_and_column"), (8, "token"),
                                              (4, "token_and_column"), (4, "token")])
def test_saved_bytes_are_the_codes_one_scale_per_token_and_one_per_column(bits, scales):
    tokens, features, size = 24, 16, 4
    x = torch.randn(tokens, features)
    paper = _layer(None, rank=1, dtype=torch.float32)
    torch.manual_seed(0)
    model = apply_velora(nn.Sequential(nn.Linear(16, 5)), VeLoRAConfig(
        sub_token_size=size, rank=size, target_modules="0", coefficient_bits=bits, coefficient_scales=scales))
    for net in (paper, model):
        net(x).sum().backward()  # v built
    saved = saved_activation_bytes(model, lambda: model(x).sum())
    paper_saved = saved_activation_bytes(paper, lambda: paper(x).sum())
    assert paper_saved == tokens * features // size * 4  # z: D/M fp32 scalars per token
    if bits is None:
        assert saved == tokens * features * 4  # r = M in fp32: as much as x
    else:  # codes + one fp32 scale per token (+ one fp32 scale per coefficient column: G·r = D at rank M)
        columns = features * 4 if scales == "token_and_column" else 0
        assert saved == tokens * math.ceil(features * bits / 8) + tokens * 4 + columns
    if bits == 8:
        assert saved - paper_saved == tokens * 4 + columns  # the paper's bytes at rank = M, plus the scales


def test_fp16_inputs_whose_z_needs_the_storage_shift_stay_finite_and_close():
    size = 16
    x = torch.empty(3, 64, dtype=torch.float16).uniform_(17000, 20000)  # z = 4·mean of 16 inputs passes 65504
    grads = {}
    for bits in (None, 8):
        torch.manual_seed(0)
        model = apply_velora(nn.Sequential(nn.Linear(64, 4, dtype=torch.float16)), VeLoRAConfig(
            sub_token_size=size, target_modules="0", init=torch.full((size,), 0.25), coefficient_bits=bits))
        model(x).float().sum().backward()
        grads[bits] = model[0].weight.grad
    assert torch.isfinite(grads[8]).all() and torch.isfinite(grads[None]).all()
    torch.testing.assert_close(grads[8].float(), grads[None].float(), rtol=1e-2, atol=0)  # 8-bit rounding only


# ---- fused peft path, diagnostic, config, resume ----------------------------------------------------------


def test_fused_lora_path_equals_the_unfused_one_with_bits():
    import lora_helpers
    from peft import LoraConfig, get_peft_model

    def build(fuse):
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
        model = get_peft_model(nn.Sequential(nn.Linear(32, 24), nn.Tanh()), config).double()
        return lora_helpers.with_velora(model, 8, rank=8, coefficient_bits=8, fuse_lora=fuse, target_modules=["0"])

    x = torch.randn(3, 5, 32, dtype=torch.float64)
    fused, unfused = build(True), build(False)
    for _ in range(2):
        out_f, gx_f, grads_f = lora_helpers.forward_backward(fused, x)
        out_u, gx_u, grads_u = lora_helpers.forward_backward(unfused, x)
        assert lora_helpers.fused_ran(fused.base_model.model[0], fused, x)
        torch.testing.assert_close(gx_f, gx_u, rtol=1e-12, atol=1e-12)
        for name in grads_f:
            torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-12, atol=1e-12, msg=name)


def test_diagnose_reports_the_rounded_gradient_and_the_bytes_kept():
    model = _layer(8, rank=4)
    model(torch.randn(8, 16, dtype=torch.float64)).sum().backward()
    x = torch.randn(8, 16, dtype=torch.float64)
    target = torch.randn(8, 5, dtype=torch.float64)
    report = velora.diagnose(model, x, loss_fn=lambda m, b: F.mse_loss(torch.tanh(m(b)), target))
    row = report.layers[0]
    layer = model[0]
    grad_out = torch.autograd.grad(F.mse_loss(torch.tanh(F.linear(x, layer.weight, layer.bias)), target),
                                   layer.weight)[0]  # the exact weight gradient
    out = F.linear(x, layer.weight.detach(), layer.bias.detach()).requires_grad_()
    g, = torch.autograd.grad(F.mse_loss(torch.tanh(out), target), out)  # (T, O)
    z = compress(x, layer.velora_v)
    approx = g.t() @ reconstruct(reference_round_trip(z.view(8, -1), 8).view(z.shape), layer.velora_v, 16)
    expected = F.cosine_similarity(approx.flatten(), grad_out.flatten(), dim=0)
    assert row.cosine == pytest.approx(float(expected), abs=1e-12) and 0.999 < row.cosine < 1.0
    assert row.energy == pytest.approx(1.0, abs=1e-12)  # rank = M: the directions keep everything
    assert row.z_bytes == 8 * 16 + 8 * 8 + 16 * 8  # int8 codes, fp64 scales per token and per column (fp64 z)


def test_config_validates_and_round_trips_coefficient_bits():
    config = VeLoRAConfig(sub_token_size=4, rank=4, coefficient_bits=4)
    assert VeLoRAConfig.from_json(config.to_json()).coefficient_bits == 4
    legacy = config.to_dict()
    legacy.pop("coefficient_bits")  # a config saved before the option existed loads as the paper's
    assert VeLoRAConfig.from_dict(legacy).coefficient_bits is None
    for bad in (16, 0, True, "8", 8.0):
        with pytest.raises(ValueError, match=f"coefficient_bits={bad!r} must be None"):
            VeLoRAConfig(coefficient_bits=bad)
    assert config.coefficient_scales == "token_and_column"
    token = VeLoRAConfig(sub_token_size=4, rank=4, coefficient_bits=8, coefficient_scales="token")
    assert VeLoRAConfig.from_json(token.to_json()) == token
    legacy = token.to_dict()
    legacy.pop("coefficient_scales")  # saved before per-column scales existed: loads as today's default
    assert VeLoRAConfig.from_dict(legacy).coefficient_scales == "token_and_column"
    with pytest.raises(ValueError, match="coefficient_scales='column' must be one of"):
        VeLoRAConfig(coefficient_bits=8, coefficient_scales="column")
    with pytest.raises(ValueError, match="coefficient_scales='token' applies only to quantised coefficients; set "
                                         "coefficient_bits"):
        VeLoRAConfig(coefficient_scales="token")



@pytest.mark.parametrize("bits", [8, 4])
def test_padding_and_an_odd_coefficient_count_per_token(bits):
    # D = 18, M = 4, pad: G = 5 groups, r = 3, so 15 coefficients a token (an odd count for 4-bit packing)
    torch.manual_seed(0)
    model = apply_velora(nn.Sequential(nn.Linear(18, 5, dtype=torch.float64)), VeLoRAConfig(
        sub_token_size=4, rank=3, pad=True, coefficient_bits=bits, target_modules="0"))
    model(torch.randn(7, 18, dtype=torch.float64)).sum().backward()  # v from the first batch
    model.zero_grad()
    x, grad = torch.randn(7, 18, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    model(x).backward(grad)
    v = model[0].velora_v
    z = compress(x, v)  # (7, 5, 3)
    x_hat = reconstruct(reference_round_trip(z.view(7, -1), bits).view(z.shape), v, 18)  # (7, 18)
    torch.testing.assert_close(model[0].weight.grad, grad.t() @ x_hat, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_bf16_autocast_keeps_codes_on_the_gpu_and_matches_the_cpu_op(bits):
    """Under CUDA bf16 autocast: codes and scales live on the GPU, the weight gradient equals the CPU op's on the
    same bf16 input (the rounding is elementwise, so only the matmuls' summation order differs)."""
    torch.manual_seed(0)
    cpu = apply_velora(nn.Sequential(nn.Linear(64, 32)), VeLoRAConfig(
        sub_token_size=4, rank=4, coefficient_bits=bits, target_modules="0", init=torch.eye(4)))
    gpu = apply_velora(nn.Sequential(nn.Linear(64, 32)).cuda(), VeLoRAConfig(
        sub_token_size=4, rank=4, coefficient_bits=bits, target_modules="0", init=torch.eye(4)))
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(256, 64).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu_out = gpu(x.cuda())
    gpu_out.float().sum().backward()
    codes = [t for t in saved if t.dtype in (torch.int8, torch.uint8)]
    assert codes and all(t.is_cuda for t in codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu(x).float().sum().backward()
    torch.testing.assert_close(gpu[0].weight.grad.cpu(), cpu[0].weight.grad, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_frozen_weight_saves_no_coefficients_and_the_input_gradient_stays_exact(bits):
    from velora.core.functional import velora_linear

    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 16, dtype=torch.float64)  # no gradient wanted: nothing to compress
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = velora_linear(x, weight, None, torch.eye(4, dtype=torch.float64), 1.0, bits)
    out.sum().backward()
    assert not any(t.dtype in (torch.int8, torch.uint8) for t in saved)
    torch.testing.assert_close(x.grad, weight.sum(0).expand(5, 16), rtol=0, atol=1e-12)
