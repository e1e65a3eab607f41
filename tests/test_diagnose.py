"""velora.diagnose: exact on constructed inputs, the chance level r/M on isotropic inputs, the gradient cosine
against independent references (explicit x̂ through plain autograd, the real VeLoRA backward on GPT-2 and on a
fused peft LoRA), the model left untouched, and `velora train --diagnose-every` leaving the run bitwise alike."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import velora
from velora import VeLoRAConfig, apply_velora
from velora.core.fidelity import DiagnosisLog
from velora.training.loop import TrainConfig, train


class TwoLayer(nn.Module):
    """x -> fc (wrapped) -> tanh -> head: the output gradient of fc depends on the data through tanh."""

    def __init__(self, in_features: int, hidden: int = 6, dtype=torch.float64) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, hidden, dtype=dtype)
        self.head = nn.Linear(hidden, 3, dtype=dtype)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.fc(x))))  # (..., 3)


def _loss_fn(target: torch.Tensor):
    return lambda model, x: F.mse_loss(model(x), target)


def _orthonormal(size: int, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=torch.float64))  # (M, r)
    return q


def _wrapped(in_features: int, directions: torch.Tensor, pad: bool = False, seed: int = 0) -> TwoLayer:
    torch.manual_seed(seed)
    model = TwoLayer(in_features)
    size, rank = directions.shape
    apply_velora(model, VeLoRAConfig(sub_token_size=size, rank=rank, init=directions, target_modules=["fc"], pad=pad))
    model.drop.p = 0.0  # keep the references deterministic (the untouched-model test turns dropout on)
    return model


@pytest.mark.parametrize("rank", [1, 3])
def test_sub_tokens_on_span_keep_all_energy_and_the_exact_gradient(rank):
    size, groups = 8, 4
    directions = _orthonormal(size, rank, seed=1)  # (M, r)
    model = _wrapped(size * groups, directions)
    coefficients = torch.randn(5, 7, groups, rank, dtype=torch.float64)  # (B, T, G, r)
    x = (coefficients @ directions.t()).reshape(5, 7, size * groups)  # every sub-token = V c, (B, T, D)
    x[0, 0] = 0.0  # an all-zero token contributes nothing and divides by nothing
    report = velora.diagnose(model, x, loss_fn=_loss_fn(torch.randn(5, 7, 3, dtype=torch.float64)))
    (row,) = report.layers
    assert row.energy == pytest.approx(1.0, abs=1e-12)
    assert row.cosine == pytest.approx(1.0, abs=1e-12)
    assert row.norm_ratio == pytest.approx(1.0, abs=1e-12)
    assert row.column_error == pytest.approx(0.0, abs=1e-12)
    assert (row.sub_token_size, row.rank, row.tokens) == (size, rank, 35)
    assert row.z_bytes * size == row.x_bytes * rank  # z keeps r of every M numbers


@pytest.mark.parametrize("size, rank", [(16, 1), (16, 4), (32, 2)])
def test_isotropic_inputs_keep_r_over_m_within_sampling_error(size, rank):
    directions = _orthonormal(size, rank, seed=2)
    model = _wrapped(size * 8, directions)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 10, size * 8, generator=generator, dtype=torch.float64)  # (B, T, D), N = 5120 sub-tokens
    report = velora.diagnose(model, x, loss_fn=_loss_fn(torch.zeros(64, 10, 3, dtype=torch.float64)))
    (row,) = report.layers
    # Σ‖Vᵀs‖² ~ χ²(rN) and the rest ~ χ²((M-r)N), independent: the share is Beta(rN/2, (M-r)N/2)
    samples = row.tokens * 8
    share = rank / size
    std = math.sqrt(share * (1 - share) / (size * samples / 2 + 1))
    assert abs(row.energy - share) < 5 * std, (row.energy, share, std)
    assert row.chance_energy == share


def _explicit_x_hat(x: torch.Tensor, directions: torch.Tensor, scale: float) -> torch.Tensor:
    """Per sub-token V Vᵀ s, written out with a loop over groups (zero-padded tail, then cut)."""
    size = directions.shape[0]
    features = x.shape[-1]
    groups = -(-features // size)
    padded = torch.zeros(*x.shape[:-1], groups * size, dtype=x.dtype)
    padded[..., :features] = x
    pieces = []
    for g in range(groups):
        piece = padded[..., g * size:(g + 1) * size]  # (..., M)
        pieces.append((piece @ directions) @ directions.t())  # (..., M)
    return scale * torch.cat(pieces, dim=-1)[..., :features]  # (..., D)


@pytest.mark.parametrize("features, size, rank, scale", [(24, 8, 1, 1.0), (10, 4, 2, 1.0), (12, 4, 1, 0.5)])
def test_cosine_and_ratio_match_plain_autograd_with_explicit_x_hat(features, size, rank, scale):
    directions = _orthonormal(size, rank, seed=4)
    pad = features % size != 0
    model = _wrapped(features, directions, pad=pad, seed=5)
    model.fc.velora_config.scale = scale
    x = torch.randn(3, 9, features, dtype=torch.float64)  # (B, T, D)
    x[1, 2] = 0.0
    target = torch.randn(3, 9, 3, dtype=torch.float64)
    report = velora.diagnose(model, x, loss_fn=_loss_fn(target))

    # reference: the same weights in a plain module, autograd through x (exact) and through x̂ (what VeLoRA keeps)
    weight = model.fc.weight.detach().clone().requires_grad_(True)  # (O, D)

    def weight_grad(inputs: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(inputs, weight, model.fc.bias) + F.linear(x - inputs, weight.detach())  # value of fc(x)
        out = model.head(torch.tanh(hidden))  # (B, T, 3)
        (grad,) = torch.autograd.grad(F.mse_loss(out, target), weight)
        return grad  # (O, D)

    exact = weight_grad(x)
    approx = weight_grad(_explicit_x_hat(x, directions, scale))
    cosine = float((exact * approx).sum() / (exact.norm() * approx.norm()))
    (row,) = report.layers
    assert row.cosine == pytest.approx(cosine, abs=1e-12)
    assert row.norm_ratio == pytest.approx(float(approx.norm() / exact.norm()), abs=1e-12)
    column_errors = sorted(float((approx[:, j] - exact[:, j]).norm() / exact[:, j].norm()) for j in range(features))
    middle = features // 2  # every test width is even: the mean of the two middle values
    assert row.column_error == pytest.approx((column_errors[middle - 1] + column_errors[middle]) / 2, abs=1e-12)
    assert 0 < row.cosine < 0.999  # random data: the reference is not trivially 1
    if not pad:  # x̂ = x P with P an orthogonal projector, so Gᵀx̂ = (Gᵀx) P and cos = ‖(Gᵀx) P‖ / ‖Gᵀx‖
        assert row.norm_ratio == pytest.approx(scale * row.cosine, abs=1e-12)
    rows = x.reshape(-1, features)  # (T, D)
    kept = sum(float((_pad(rows, size)[:, g * size:(g + 1) * size] @ directions).pow(2).sum())
               for g in range(-(-features // size)))
    assert row.energy == pytest.approx(kept / float(rows.pow(2).sum()), abs=1e-12)


def _pad(rows: torch.Tensor, size: int) -> torch.Tensor:
    extra = -rows.shape[1] % size
    return F.pad(rows, (0, extra))  # (T, G*M)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double()


def test_gpt2_conv1d_cosine_matches_the_real_velora_backward():
    """Conv1D keeps its weight as (D, O): the report must equal the cosine between the weight gradient the VeLoRA
    op really computes in training and the plain model's autograd gradient."""
    import copy

    plain = _tiny_gpt2()
    model = copy.deepcopy(plain)
    apply_velora(model, VeLoRAConfig(sub_token_size=16, target_modules="paper"))  # mlp.c_proj, D = 128
    model.train()
    first, batch = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (3, 12))
    model(input_ids=first, labels=first)  # builds v
    report = velora.diagnose(model, batch)

    model(input_ids=batch, labels=batch).loss.backward()  # the VeLoRA op's own gradient
    plain.train()
    plain(input_ids=batch, labels=batch).loss.backward()
    names = [f"transformer.h.{i}.mlp.c_proj" for i in range(2)]
    assert [row.name for row in report.layers] == names
    for row, name in zip(report.layers, names):
        approx = model.get_submodule(name).weight.grad  # (D, O)
        exact = plain.get_submodule(name).weight.grad  # (D, O)
        cosine = float((exact * approx).sum() / (exact.norm() * approx.norm()))
        assert row.cosine == pytest.approx(cosine, abs=1e-10)
        assert row.norm_ratio == pytest.approx(float(approx.norm() / exact.norm()), abs=1e-10)
        assert row.in_features == 128


def test_fused_peft_lora_a_matches_the_real_fused_backward():
    """Adapter mode: the peft LoRA layer runs VeLoRA fused; the report equals the fused op's own lora_A gradient
    against plain peft LoRA's."""
    import copy

    from peft import LoraConfig, get_peft_model

    from velora.core.lora_fused import FusedLoRAMixin
    from velora.training.models import build_config, build_model

    torch.manual_seed(0)
    base = build_model(build_config("llama-tiny", vocab_size=64)).double()
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"]))
    for name, param in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B = 0 would give lora_A a zero gradient
    model = copy.deepcopy(plain)
    apply_velora(model, VeLoRAConfig(sub_token_size=16, target_modules="paper"))
    assert any(isinstance(m, FusedLoRAMixin) for m in model.modules())
    model.train()
    plain.train()
    first, batch = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    model(input_ids=first, labels=first)
    report = velora.diagnose(model, batch)
    model(input_ids=batch, labels=batch).loss.backward()
    plain(input_ids=batch, labels=batch).loss.backward()
    assert len(report.layers) == 4
    for row in report.layers:
        assert row.name.endswith("lora_A.default")
        approx, exact = model.get_submodule(row.name).weight.grad, plain.get_submodule(row.name).weight.grad
        cosine = float((exact * approx).sum() / (exact.norm() * approx.norm()))
        assert row.cosine == pytest.approx(cosine, abs=1e-10)


def test_gradient_checkpointing_gives_the_same_report():
    """+ckpt re-runs forwards inside the backward; those re-runs must not count as extra calls."""
    import copy

    from velora.training.models import build_config, build_model

    torch.manual_seed(0)
    model = build_model(build_config("llama-tiny", vocab_size=64)).double()
    apply_velora(model, VeLoRAConfig(sub_token_size=16))
    model.train()
    first, batch = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    model(input_ids=first, labels=first)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain_rows, ckpt_rows = velora.diagnose(model, batch).layers, velora.diagnose(checkpointed, batch).layers
    assert [r.tokens for r in ckpt_rows] == [r.tokens for r in plain_rows] == [32] * 4
    for a, b in zip(plain_rows, ckpt_rows):
        assert a.name == b.name and b.cosine == pytest.approx(a.cosine, abs=1e-10)


def test_the_model_is_left_untouched():
    directions = _orthonormal(8, 1, seed=6)
    torch.manual_seed(0)
    model = TwoLayer(32)
    model.register_buffer("step_counter", torch.zeros(()))  # a buffer a train-mode forward moves in place
    forward = model.forward

    def counting_forward(x):
        model.step_counter += 1
        return forward(x)

    model.forward = counting_forward
    apply_velora(model, VeLoRAConfig(sub_token_size=8, init="ema", target_modules=["fc"]))
    model.train()
    model(torch.randn(4, 32, dtype=torch.float64)).sum().backward()  # v from a first batch
    model.zero_grad(set_to_none=True)
    model.fc.velora_v = directions.clone()
    model.eval()
    model.head.train()  # mixed modes come back as they were
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randn(6, 32, dtype=torch.float64)
    wrapped_class, rng = type(model.fc), torch.get_rng_state()

    report = velora.diagnose(model, batch, loss_fn=lambda m, x: m(x).square().sum())

    assert report.layers and report.layers[0].name == "fc"
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # v, EMA mean, counter
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout ran in train mode, its draws are undone
    assert type(model.fc) is wrapped_class and not model.fc._forward_hooks
    assert [m.training for m in model.modules()] == [False, False, True, False]


def test_a_ddp_wrapped_model_is_diagnosed_without_disturbing_its_next_step(tmp_path):
    import torch.distributed as dist

    from velora.training.models import build_config, build_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model(build_config("llama-tiny", vocab_size=64))
        apply_velora(model, VeLoRAConfig(sub_token_size=16))
        model.train()
        ddp = nn.parallel.DistributedDataParallel(model)
        first, batch = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
        ddp(input_ids=first, labels=first).loss.backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        report = velora.diagnose(ddp, batch)
        assert [row.name for row in report.layers][0] == "model.layers.0.self_attn.v_proj"
        ddp(input_ids=first, labels=first).loss.backward()  # the reducer is not left waiting
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))
    finally:
        dist.destroy_process_group()


def test_errors_are_one_line():
    model = TwoLayer(16)
    with pytest.raises(ValueError, match="no VeLoRA layers"):
        velora.diagnose(model, torch.randn(2, 16, dtype=torch.float64), loss_fn=lambda m, x: m(x).sum())
    apply_velora(model, VeLoRAConfig(sub_token_size=8, target_modules=["fc"]))
    with pytest.raises(ValueError, match="have no v yet"):
        velora.diagnose(model, torch.randn(2, 16, dtype=torch.float64), loss_fn=lambda m, x: m(x).sum())
    model.train()
    model(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="pass loss_fn"):
        velora.diagnose(model, torch.randn(2, 16, dtype=torch.float64))
    model.fc.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no VeLoRA layer compressed"):
        velora.diagnose(model, torch.randn(2, 16, dtype=torch.float64), loss_fn=lambda m, x: m(x).sum())


def test_report_serialises_and_renders():
    model = _wrapped(16, _orthonormal(8, 1, seed=7))
    zero_grad = velora.diagnose(model, torch.randn(4, 16, dtype=torch.float64),
                                loss_fn=lambda m, x: m(x).sum() * 0)
    data = json.loads(json.dumps(zero_grad.to_dict()))
    assert data["layers"][0]["cosine"] is None and data["layers"][0]["energy"] is not None
    assert "exact weight gradient is zero" in zero_grad.to_markdown()
    report = velora.diagnose(model, torch.randn(4, 16, dtype=torch.float64), loss_fn=lambda m, x: m(x).square().sum())
    error = report.layers[0].column_error
    assert 0 < error and report.to_dict()["median_column_error"] == error
    assert f"median column error {error:.4f} over 1 layer(s)" in report.to_markdown()


def test_diagnosis_log_sends_each_layer_to_the_scalar_writer(tmp_path):
    """The TensorBoard path: RunLog.scalar receives one cosine, energy and column-error tag per layer per step, and
    diagnose.csv the same row."""
    model = _wrapped(16, _orthonormal(8, 1, seed=8))
    report = velora.diagnose(model, torch.randn(4, 16, dtype=torch.float64), loss_fn=lambda m, x: m(x).square().sum())
    seen = []
    log = DiagnosisLog(tmp_path, every=3, scalar=lambda tag, value, step: seen.append((tag, value, step)))
    log.after_backward(2, model, torch.randn(4, 16, dtype=torch.float64))  # not due: nothing written
    log.write(3, report)
    row = report.layers[0]
    assert seen == [("fidelity/cosine/fc", row.cosine, 3), ("fidelity/energy/fc", row.energy, 3),
                    ("fidelity/column_error/fc", row.column_error, 3)]
    with open(tmp_path / "diagnose.csv") as fh:
        (logged,) = list(csv.DictReader(fh))
    assert logged["step"] == "3" and float(logged["column_error"]) == row.column_error


def test_diagnosis_log_never_writes_through_a_symlink(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnose.csv").symlink_to(outside)
    model = _wrapped(16, _orthonormal(8, 1, seed=9))
    log = DiagnosisLog(run, every=1, resume_step=3)
    log.write(4, velora.diagnose(model, torch.randn(4, 16, dtype=torch.float64), loss_fn=lambda m, x: m(x).sum()))
    assert outside.read_text() == "keep me\n"
    assert not (run / "diagnose.csv").is_symlink() and "fc" in (run / "diagnose.csv").read_text()


def _tiny_run(text_file, **changes) -> TrainConfig:
    settings = dict(method="velora", model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32,
                    batch_size=4, steps=6, lr=3e-3, warmup_steps=2, eval_batches=2,
                    velora={"sub_token_size": 16, "target_modules": "paper", "init": "ema"})
    settings.update(changes)
    return TrainConfig(**settings)


def test_train_diagnose_every_leaves_the_run_bitwise_alike_and_logs_each_layer(tmp_path, text_file):
    config = _tiny_run(text_file)
    plain = train(config, tmp_path / "plain", measure=False, tensorboard=False)
    logged = train(config, tmp_path / "logged", measure=False, tensorboard=False, diagnose_every=2)
    assert logged["loss_curve"] == plain["loss_curve"]
    a, b = plain["_model"].state_dict(), logged["_model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights and the EMA-moved v alike
    with open(tmp_path / "logged" / "diagnose.csv") as fh:
        rows = list(csv.DictReader(fh))
    layers = {name for name in velora.velora_modules(logged["_model"])}
    assert len(layers) == 4 and len(rows) == 4 * 3
    assert [int(r["step"]) for r in rows] == [2] * 4 + [4] * 4 + [6] * 4
    assert {r["layer"] for r in rows} == layers
    assert all(0 < float(r["energy"]) <= 1 and -1 <= float(r["cosine"]) <= 1 for r in rows)
    assert not (tmp_path / "plain" / "diagnose.csv").exists()


def test_train_diagnose_resume_drops_rows_past_the_checkpoint(tmp_path, text_file):
    config = _tiny_run(text_file, steps=4, velora={"sub_token_size": 16, "target_modules": "paper"})
    train(config, tmp_path / "run", measure=False, tensorboard=False, diagnose_every=1, stop_at_step=2)
    path = tmp_path / "run" / "diagnose.csv"
    with open(path, "a") as fh:
        fh.write("3,stale,0.5,0.5,0.5\n")  # a crash after step 3 was logged but before it was checkpointed
    train(config, tmp_path / "run", measure=False, tensorboard=False, diagnose_every=1, resume=True)
    with open(path) as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4


def test_train_diagnose_every_refuses_a_method_without_velora(tmp_path, text_file):
    with pytest.raises(ValueError, match="no VeLoRA layers"):
        train(_tiny_run(text_file, method="full", steps=1), tmp_path / "run", measure=False, diagnose_every=1)
    with pytest.raises(ValueError, match="pass --out"):
        train(_tiny_run(text_file, steps=1), None, measure=False, diagnose_every=1)


def test_cli_diagnose_json(capsys, text_file):
    from velora.cli import main

    code = main(["diagnose", "--model", "llama-tiny", "--method", "velora", "--data", str(text_file),
                 "--tokenizer", "byte", "--batch", "2", "--seq", "32", "--sub-token-size", "16", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in data["layers"]] == [f"model.layers.{i}.{part}" for i in range(2)
                                                       for part in ("self_attn.v_proj", "mlp.down_proj")]
    assert all(0 < row["energy"] <= 1 and row["z_bytes"] * 16 == row["x_bytes"] for row in data["layers"])
    assert main(["diagnose", "--method", "lora", "--data", str(text_file), "--tokenizer", "byte"]) == 2
    assert "add +velora" in capsys.readouterr().err


def test_cli_diagnose_per_group_directions_keep_at_least_the_shared_ones_energy(capsys, text_file):
    """--per-group reaches the layers: each group's own top-2 singular vectors of the diagnosed batch keep at least
    the energy of the top-2 shared by every group (a per-group optimum is at least the shared one, group by group)."""
    from velora.cli import main

    energies = {}
    for extra in ([], ["--per-group"]):
        assert main(["diagnose", "--model", "llama-tiny", "--method", "velora", "--data", str(text_file),
                     "--tokenizer", "byte", "--batch", "2", "--seq", "32", "--sub-token-size", "8", "--init", "svd",
                     "--rank", "2", "--json", *extra]) == 0
        energies[bool(extra)] = [row["energy"] for row in json.loads(capsys.readouterr().out)["layers"]]
    assert all(group >= shared - 1e-6 for shared, group in zip(energies[False], energies[True], strict=True))
    assert sum(energies[True]) > sum(energies[False]) + 1e-3
