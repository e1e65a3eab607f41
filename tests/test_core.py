"""VeLoRA core: the op against plain autograd, memory by counting saved bytes, state, surgery, errors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import velora
from velora.core.functional import VeLoRALinearFunction, velora_linear
from velora.core.subtoken import (
    compress,
    factored_weight_grad,
    group,
    initial_directions,
    orthonormalise,
    reconstruct,
)


def saved_bytes(fn, model: nn.Module | None = None, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of unique storages autograd keeps for backward while ``fn()`` runs; parameters and buffers
    of ``model`` (and ``exclude``) left out by storage pointer. Tensors are held so data_ptr keys stay valid."""
    state = [*model.parameters(), *model.buffers()] if model is not None else []
    excluded = {t.untyped_storage().data_ptr() for t in [*state, *exclude]}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and ptr not in kept:
            kept[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(t.untyped_storage().nbytes() for t in kept.values())
    del out
    return total


def on_span_input(tokens: int, in_features: int, directions: torch.Tensor, generator) -> torch.Tensor:
    """An input whose every sub-token lies in span(V): x = reconstruct(z, V) for random z."""
    size, rank = directions.shape
    groups = in_features // size
    z = torch.randn(tokens, groups, rank, dtype=directions.dtype, generator=generator)
    return reconstruct(z, directions, in_features)


# ---- the op ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3])
def test_gradients_exact_when_subtokens_on_span(rank):
    gen = torch.Generator().manual_seed(0)
    D, O, M, T = 48, 20, 8, 30
    V = orthonormalise(torch.randn(M, rank, dtype=torch.float64, generator=gen))
    x = on_span_input(T, D, V, gen).view(5, 6, D).requires_grad_()
    W = torch.randn(O, D, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(O, dtype=torch.float64, generator=gen, requires_grad=True)
    grad_out = torch.randn(5, 6, O, dtype=torch.float64, generator=gen)

    out = velora_linear(x, W, b, V)
    ref_x, ref_W, ref_b = (t.detach().clone().requires_grad_() for t in (x, W, b))
    ref = F.linear(ref_x, ref_W, ref_b)
    assert torch.equal(out, ref)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(W.grad, ref_W.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, ref_b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank,pad", [(1, False), (4, False), (1, True), (2, True)])
def test_factored_grad_equals_reconstruct_then_matmul(rank, pad):
    gen = torch.Generator().manual_seed(1)
    D = 50 if pad else 64
    O, M, T = 12, 16, 40
    V = orthonormalise(torch.randn(M, rank, dtype=torch.float64, generator=gen))
    x = torch.randn(T, D, dtype=torch.float64, generator=gen)  # generic input, not on span(V)
    G = torch.randn(T, O, dtype=torch.float64, generator=gen)
    z = compress(x, V)  # (T, G, r)
    assert z.shape == (T, -(-D // M), rank)
    x_hat = reconstruct(z, V, D, scale=1.5)  # (T, D)
    expected = G.t() @ x_hat
    got = factored_weight_grad(G, z, V, D, scale=1.5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # rank r is r separate directions, not their sum projected once
    if rank > 1:
        summed = V.sum(1, keepdim=True) / V.sum(1).norm()
        assert not torch.allclose(factored_weight_grad(G, compress(x, summed), summed, D), expected)


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(2)
    D, O, M = 12, 5, 4
    V = orthonormalise(torch.randn(M, 2, dtype=torch.float64, generator=gen))
    x = on_span_input(6, D, V, gen).requires_grad_()
    W = torch.randn(O, D, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(O, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, W, b: VeLoRALinearFunction.apply(x, W, b, V, 1.0), (x, W, b))


def test_needs_input_grad_honoured():
    gen = torch.Generator().manual_seed(3)
    V = orthonormalise(torch.randn(8, 1, generator=gen))
    x = torch.randn(10, 32, generator=gen)  # no grad for x
    W = torch.randn(6, 32, generator=gen, requires_grad=True)
    nbytes = saved_bytes(lambda: velora_linear(x, W, None, V).sum().backward(), exclude=(V, W))
    assert nbytes == 10 * 4 * 4  # only z: T * D/M * r fp32 values
    assert W.grad is not None
    W2 = torch.randn(6, 32, generator=gen)  # frozen weight: no z at all
    x2 = torch.randn(10, 32, generator=gen, requires_grad=True)
    assert saved_bytes(lambda: velora_linear(x2, W2, None, V).sum().backward(), exclude=(V, W2)) == 0
    torch.testing.assert_close(x2.grad, torch.ones(10, 6) @ W2)


# ---- module surgery ------------------------------------------------------------------------------------


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(dtype)


def test_forward_identical_and_eval_plain():
    model = mlp()
    plain = mlp()
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, target_modules=["0", "2"]))
    x = torch.randn(3, 7, 64)
    assert torch.equal(model(x), plain(x))
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    xg = x.clone().requires_grad_()
    # eval with grad enabled: the plain layer, saving exactly what plain saves
    assert saved_bytes(lambda: model(xg).sum(), model) == saved_bytes(lambda: plain(xg).sum(), plain)


def test_saved_bytes_per_layer_drop_by_m():
    model, plain = mlp(), mlp()
    M = 16
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=M, target_modules="2"))
    x = torch.randn(4, 10, 64)
    model(x)  # the first batch initialises v (a new buffer, excluded from the count like all buffers)
    compressed = saved_bytes(lambda: model(x).sum(), model)
    full = saved_bytes(lambda: plain(x).sum(), plain)
    hidden = 4 * 10 * 96  # the input of layer "2"
    assert full - compressed == hidden * 4 - (hidden // M) * 4


def test_rank_r_saves_r_scalars_per_subtoken():
    model = mlp()
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, rank=3, init="svd", target_modules="2"))
    plain = mlp()
    x = torch.randn(4, 10, 64)
    model(x)  # initialise v
    diff = saved_bytes(lambda: plain(x).sum(), plain) - saved_bytes(lambda: model(x).sum(), model)
    hidden = 4 * 10 * 96
    assert diff == hidden * 4 - (hidden // 16) * 3 * 4


def test_tiny_llama_down_proj_saved_bytes_drop_exactly():
    from velora.training.models import build_config, build_model

    cfg = build_config("llama-tiny", vocab_size=256)
    torch.manual_seed(0)
    plain = build_model(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    M = 32
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=M, target_modules="down_proj"))
    ids = torch.randint(0, 256, (2, 48))
    model(input_ids=ids)  # first batch initialises v
    compressed = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, model)
    full = saved_bytes(lambda: plain(input_ids=ids, labels=ids).loss, plain)
    down_inputs = cfg.num_hidden_layers * 2 * 48 * cfg.intermediate_size  # elements, fp32
    assert full - compressed == down_inputs * 4 - (down_inputs // M) * 4


def test_conv1d_gpt2_wrapped():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(24, 32)  # nx=32 -> nf=24, weight (32, 24)
    ref = Conv1D(24, 32)
    ref.load_state_dict(layer.state_dict())
    holder = nn.ModuleDict({"c_proj": layer})
    velora.apply_velora(holder, velora.VeLoRAConfig(sub_token_size=8, target_modules="c_proj"))
    assert type(holder["c_proj"]).__name__ == "VeLoRAConv1D"
    V = orthonormalise(torch.randn(8, 1))
    holder["c_proj"].velora_v = V
    holder["c_proj"]._velora_ready = True
    x = on_span_input(10, 32, V.double(), torch.Generator().manual_seed(0)).float()
    out = holder["c_proj"](x)
    expected = ref(x)
    torch.testing.assert_close(out, expected)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    torch.testing.assert_close(holder["c_proj"].weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    assert transformers is not None


def test_num_groups_spelling_and_pad():
    model = nn.Sequential(nn.Linear(50, 8))
    with pytest.raises(ValueError, match=r"sub_token_size=16 does not divide in_features=50 of '0'; pick a divisor"):
        velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, target_modules="0"))
    velora.apply_velora(model, velora.VeLoRAConfig(num_groups=4, pad=True, target_modules="0"))
    assert model[0].velora_sub_token_size == 13
    x = torch.randn(6, 50)
    model(x).sum().backward()
    V = model[0].velora_v
    expected = torch.ones(6, 8).t() @ reconstruct(compress(x, V), V, 50)
    torch.testing.assert_close(model[0].weight.grad, expected)


# ---- initialisation --------------------------------------------------------------------------------


def test_batch_average_once_is_normalised_mean_then_frozen():
    model = mlp()
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, target_modules="0"))
    x = torch.randn(5, 64) + 0.5
    model(x)
    mean = x.reshape(-1, 16).mean(0)
    torch.testing.assert_close(model[0].velora_v[:, 0], mean / mean.norm())
    before = model[0].velora_v.clone()
    model(torch.randn(5, 64) - 3)
    assert torch.equal(model[0].velora_v, before)


def test_svd_random_user_and_fallbacks():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 32, generator=gen) @ torch.diag(torch.linspace(3, 0.1, 32)).repeat(1, 1)
    V = initial_directions(x, 32, 2, "svd")
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(V.abs(), vh[:2].t().abs(), rtol=1e-4, atol=1e-5)
    state = torch.get_rng_state()
    r1 = initial_directions(x, 32, 3, "random", seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG consumed
    assert torch.equal(r1, initial_directions(x, 32, 3, "random", seed=7))
    torch.testing.assert_close(r1.t() @ r1, torch.eye(3), rtol=0, atol=1e-6)
    # zero mean falls back to the SVD direction; an all-zero batch to the uniform direction
    sym = torch.cat([x, -x])
    torch.testing.assert_close(initial_directions(sym, 32, 1, "batch_average_once").abs(),
                               initial_directions(sym, 32, 1, "svd").abs())
    zero = initial_directions(torch.zeros(4, 32), 32, 1, "batch_average_once")
    torch.testing.assert_close(zero[:, 0], torch.full((32,), 32 ** -0.5))
    # rank > 1 from the batch average: first column is the mean direction, columns orthonormal
    V3 = initial_directions(x + 1, 32, 3, "batch_average_once")
    mean = (x + 1).mean(0)
    torch.testing.assert_close(V3[:, 0], mean / mean.norm())
    torch.testing.assert_close(V3.t() @ V3, torch.eye(3), rtol=0, atol=1e-5)
    # user tensor
    model = mlp()
    user = torch.arange(16, dtype=torch.float32) + 1
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, init=user, target_modules="0"))
    torch.testing.assert_close(model[0].velora_v[:, 0], user / user.norm())


def test_nan_in_init_batch_is_an_error():
    model = mlp()
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, target_modules="0"))
    x = torch.randn(4, 64)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        model(x)
    assert not model[0]._velora_ready


def test_ema_replaces_v_out_of_place_pending_backward_uses_old_v():
    model = nn.Sequential(nn.Linear(64, 24))
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, init="ema", ema_decay=0.5, target_modules="0"))
    x1, x2 = torch.randn(4, 64) + 1, torch.randn(4, 64) - 2
    model(x1)  # init
    v_init = model[0].velora_v
    v_init_copy = v_init.clone()
    out = model(x1)  # EMA step; this forward saves the v current after its update
    v_used = model[0].velora_v
    model(x2).sum()  # another EMA step replaces v while `out` still waits for backward
    assert not torch.equal(model[0].velora_v, v_used)
    assert torch.equal(v_init, v_init_copy)  # replaced, never mutated in place
    out.sum().backward()
    # the weight grad uses the v that was current at that forward
    expected = torch.ones(4, 24).t() @ reconstruct(compress(x1, v_used), v_used, 64)
    torch.testing.assert_close(model[0].weight.grad, expected)
    running = 0.5 * (x1.reshape(-1, 16).mean(0)) + 0.5 * x2.reshape(-1, 16).mean(0)
    torch.testing.assert_close(model[0].velora_v[:, 0], running / running.norm())


# ---- state --------------------------------------------------------------------------------------------


def test_state_round_trip_no_reinit_after_load():
    cfg = velora.VeLoRAConfig(sub_token_size=16, target_modules=["0", "2"])
    model = velora.apply_velora(mlp(), cfg)
    model(torch.randn(8, 64) + 1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = velora.apply_velora(mlp(seed=1), cfg)
    fresh.load_state_dict(state)
    assert fresh[0]._velora_ready
    fresh(torch.randn(8, 64) - 5)  # a very different next batch must not re-initialise v
    assert torch.equal(fresh[0].velora_v, model[0].velora_v)
    assert torch.equal(fresh[2].velora_v, model[2].velora_v)


def test_remove_restores_modules_and_keys():
    model = mlp()
    keys = list(model.state_dict())
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, target_modules=["0", "2"]))
    assert "0.velora_v" in model.state_dict()
    model(torch.randn(2, 64))
    velora.remove_velora(model)
    assert list(model.state_dict()) == keys
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert velora.velora_modules(model) == {}


def test_apply_twice():
    cfg = velora.VeLoRAConfig(sub_token_size=16, target_modules="0")
    model = velora.apply_velora(mlp(), cfg)
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, target_modules="0"))  # same: no-op
    with pytest.raises(ValueError, match="already has VeLoRA with a different config; call remove_velora"):
        velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=8, target_modules="0"))


def test_config_json_round_trip():
    cfg = velora.VeLoRAConfig(num_groups=4, rank=2, init="svd", target_modules=["v_proj", "re:.*down.*"])
    assert velora.VeLoRAConfig.from_json(cfg.to_json()) == cfg
    user = velora.VeLoRAConfig(sub_token_size=4, init=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(velora.VeLoRAConfig.from_json(user.to_json()).init, user.init)


# ---- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sub_token_size=0), "sub_token_size=0 must be a positive integer"),
        (dict(sub_token_size=-4), "sub_token_size=-4 must be a positive integer"),
        (dict(sub_token_size=8, num_groups=4), "give one of sub_token_size=8 and num_groups=4"),
        (dict(rank=0), "rank=0 must be an integer >= 1"),
        (dict(init="magic"), "init='magic' is unknown"),
        (dict(init="ema", rank=2), "init='ema' tracks one running mean"),
        (dict(target_modules=[]), "must be a non-empty"),
        (dict(target_modules="re:(("), "does not compile"),
        (dict(mode="sideways"), "mode='sideways' is unknown"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        velora.VeLoRAConfig(**kwargs)


def test_surgery_errors():
    with pytest.raises(ValueError, match=r"matched no layer .* linear layers here include \['0', '2'\]"):
        velora.apply_velora(mlp(), velora.VeLoRAConfig(target_modules="q_proj"))
    with pytest.raises(ValueError, match="'1' is a GELU, not an nn.Linear"):
        velora.apply_velora(mlp(), velora.VeLoRAConfig(sub_token_size=16, target_modules="1"))
    with pytest.raises(ValueError, match="rank=20 exceeds sub_token_size=16"):
        velora.apply_velora(mlp(), velora.VeLoRAConfig(sub_token_size=16, rank=20, init="svd", target_modules="0"))
    with pytest.raises(ValueError, match="larger than in_features=64"):
        velora.apply_velora(mlp(), velora.VeLoRAConfig(sub_token_size=128, target_modules="0"))
    model = mlp()
    with pytest.raises(ValueError, match=r"init tensor of shape \(8,\) does not fit '0'"):
        velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, init=torch.ones(8), target_modules="0"))
    assert type(model[0]) is nn.Linear and "velora_v" not in model[0]._buffers  # failed apply leaves it clean


# ---- dtypes ---------------------------------------------------------------------------------------------


def test_bf16_keeps_z_in_input_dtype_and_trains():
    model = mlp(dtype=torch.bfloat16)
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=16, target_modules="2"))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    model(x)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    z = [t for t in kept if t.shape == (4, 6, 1)]
    assert z and z[0].dtype == torch.bfloat16
    assert model[2].velora_v.dtype == torch.float32  # v itself kept in fp32
    out.float().pow(2).sum().backward()
    assert model[2].weight.grad.dtype == torch.bfloat16 and torch.isfinite(model[2].weight.grad).all()


def test_paper_preset_targets():
    cfg = velora.VeLoRAConfig()
    assert cfg.sub_token_size == 32
    for name in ["model.layers.3.self_attn.v_proj", "model.layers.0.mlp.down_proj", "transformer.h.1.mlp.c_proj",
                 "roberta.encoder.layer.2.attention.self.value", "roberta.encoder.layer.2.output.dense",
                 "vit.encoder.layer.0.attention.attention.value", "vit.encoder.layer.0.output.dense"]:
        assert cfg.matches(name), name
    for name in ["model.layers.3.self_attn.q_proj", "transformer.h.1.attn.c_proj",
                 "roberta.encoder.layer.2.attention.output.dense", "model.layers.0.mlp.up_proj"]:
        assert not cfg.matches(name), name


def test_group_shapes():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    g = group(x, 4)
    assert g.shape == (6, 2, 4)
    assert torch.equal(g[1, 1], torch.tensor([12.0, 13, 14, 15]))


def test_gradnorm_lorp_layer_composes_with_velora():
    """VeLoRA on a GradNormLoRP layer: grad_W of the composed weight flows on to m, I and J; exact when the
    input's sub-tokens lie on span(v), and the layer keeps z instead of x."""
    from velora.methods.gradnorm_lorp.model import GradNormLoRPConfig, apply_gradnorm_lorp

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 48))
        apply_gradnorm_lorp(model, GradNormLoRPConfig(rank=4, alpha=8, target_modules=["0"]))
        with torch.no_grad():
            model[0].lora_I.normal_()  # move away from the init, where I = 0 hides the J gradient
        return model.double()

    plain, model = build(), build()
    V = orthonormalise(torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    velora.apply_velora(model, velora.VeLoRAConfig(sub_token_size=8, init=V[:, 0], target_modules="0"))
    assert type(model[0]).__name__ == "VeLoRAGradNormLoRPLinear"
    x = on_span_input(20, 32, V, torch.Generator().manual_seed(6))
    out, ref = model(x), plain(x)
    assert torch.equal(out, ref)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    for name in ("magnitude", "lora_I", "lora_J"):
        torch.testing.assert_close(getattr(model[0], name).grad, getattr(plain[0], name).grad, rtol=1e-10, atol=1e-10)
    keep = saved_bytes(lambda: model(x).sum(), model)
    full = saved_bytes(lambda: plain(x).sum(), plain)
    assert full - keep == 20 * 32 * 8 - 20 * 4 * 8  # x (fp64) swapped for z
