"""Flora (FLoRA Alg. 2): references, momentum transfer, seeds, which params keep full state, 8-bit."""

from __future__ import annotations

import io

import pytest
import torch

from velora.optim import Flora, derive_seed, random_projection
from velora.optim.flora import PAPER_ALG2
from velora.optim.projections import compression_plan
from velora.optim.quant import dequantize_blockwise, quantize_blockwise
from velora.training.models import build_config, build_model

torch.set_num_threads(1)


def _run(make, shape, steps, grads_seed=1, zero_grad_at=()):
    """Train a matrix and a bias on fixed random gradients; returns (matrix, bias, optimizer)."""
    torch.manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(shape))
    bias = torch.nn.Parameter(torch.randn(shape[1]))
    optimizer = make([matrix, bias])
    generator = torch.Generator().manual_seed(grads_seed)
    for step in range(steps):
        matrix.grad = torch.randn(shape, generator=generator)
        bias.grad = torch.randn(shape[1], generator=generator)
        if step in zero_grad_at:
            matrix.grad.zero_()
        optimizer.step()
    return matrix, bias, optimizer


@pytest.mark.parametrize("shape, project", [((6, 10), "smaller"), ((10, 6), "smaller"), ((6, 10), "larger"),
                                            ((10, 6), "larger")])
def test_adamw_base_with_full_orthogonal_projection_matches_torch_adamw(shape, project):
    # rank == projected dim and orthogonal projections: compression is exact, across kappa boundaries
    flora = _run(lambda ps: Flora(ps, lr=1e-2, rank=10, kappa=3, base="adamw", weight_decay=0.1, momentum="gradient",
                                  orthogonal=True, project=project, force_compress=True), shape, steps=8)
    adamw = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), shape, steps=8)
    assert "seed" in flora[2].state[flora[0]]  # the matrix really went through the projection path
    torch.testing.assert_close(flora[0], adamw[0], rtol=0, atol=1e-6)
    assert torch.equal(flora[1], adamw[1])  # the bias keeps a full moment: same ops as AdamW


def test_adafactor_base_without_momentum_is_torch_adafactor_bitwise():
    flora = _run(lambda ps: Flora(ps, lr=1e-2, rank=4, beta1=0.0, weight_decay=0.1), (6, 10), steps=6)
    reference = _run(lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.1), (6, 10), steps=6)
    assert torch.equal(flora[0], reference[0]) and torch.equal(flora[1], reference[1])


def _decompressed_momentum(optimizer, matrix, orthogonal=True):
    state, group = optimizer.state[matrix], optimizer.param_groups[0]
    plan = compression_plan(matrix.shape, group["rank"], force=True, project=group["project"])
    projection = random_projection(int(state["seed"]), plan.projected_dim, plan.rank, orthogonal=orthogonal)
    return state["momentum"] @ projection  # (k, p)


def test_transfer_keeps_decompressed_momentum_with_full_orthogonal_projections():
    # (6, 10) at rank 10 with the default smaller side: the rows (6) are projected at effective rank 6
    make = lambda ps: Flora(ps, lr=1e-2, rank=10, kappa=2, force_compress=True, orthogonal=True)  # noqa: E731
    before_matrix, _, before = _run(make, (6, 10), steps=2)
    momentum_before = _decompressed_momentum(before, before_matrix)
    seed_before = int(before.state[before_matrix]["seed"])
    # third step: steps_done = 2 = kappa -> new seed, M <- M A_old A_new^T; a zero gradient isolates it
    after_matrix, _, after = _run(make, (6, 10), steps=3, zero_grad_at=(2,))
    seed_after = int(after.state[after_matrix]["seed"])
    assert seed_after != seed_before and seed_after == derive_seed(0, 0, 1)
    momentum_after = _decompressed_momentum(after, after_matrix)
    torch.testing.assert_close(momentum_after, 0.9 * momentum_before, rtol=1e-5, atol=1e-6)
    # the defect we avoid: transferring with the new matrix on both sides loses the momentum
    new_projection = random_projection(seed_after, 6, 6, orthogonal=True)
    wrong = before.state[before_matrix]["momentum"] @ new_projection @ new_projection.T @ new_projection
    assert not torch.allclose(wrong, momentum_before, atol=1e-2)


def test_low_rank_transfer_is_unbiased_over_projections():
    # compress with A_old, transfer M A_old A_new^T, decompress with A_new: E[...] = m since
    # E[A^T A] = I for independent A_old, A_new. The mean over fresh seeds converges to m.
    momentum = torch.randn(4, 16)  # a full-space momentum (k, p)
    estimates = []
    for trial in range(400):
        old = random_projection(2 * trial, 16, 8)  # (r, p)
        new = random_projection(2 * trial + 1, 16, 8)
        estimates.append(momentum @ old.T @ (old @ new.T) @ new)  # (k, p)
    estimates = torch.stack(estimates)
    single_trial_error = (estimates - momentum).norm(dim=(1, 2)).mean()
    assert (estimates.mean(0) - momentum).norm() < 0.2 * single_trial_error


def test_projection_regenerated_from_seed_is_bit_identical():
    for orthogonal in (False, True):
        first = random_projection(12345, 64, 8, orthogonal=orthogonal)
        again = random_projection(12345, 64, 8, orthogonal=orthogonal)
        other = random_projection(12346, 64, 8, orthogonal=orthogonal)
        assert torch.equal(first, again) and not torch.equal(first, other)
    gaussian = random_projection(7, 512, 64)
    assert abs(gaussian.var().item() - 1 / 64) < 0.1 / 64  # entries N(0, 1/r)
    orthogonal = random_projection(7, 32, 32, orthogonal=True)
    torch.testing.assert_close(orthogonal.T @ orthogonal, torch.eye(32), atol=1e-5, rtol=0)
    assert len({derive_seed(0, i, c) for i in range(20) for c in range(20)}) == 400


@pytest.mark.parametrize("project, kept", [("smaller", 40), ("larger", 6)])
def test_state_holds_seed_and_small_momentum_only(project, kept):
    matrix, _, optimizer = _run(lambda ps: Flora(ps, lr=1e-2, rank=3, kappa=2, project=project), (6, 40), steps=5)
    state = optimizer.state[matrix]
    assert state["seed"].dtype == torch.int64 and state["seed"].shape == ()
    # (kept side, rank), not (6, 40): the smaller side projected keeps the larger one and vice versa
    assert state["momentum"].shape == (kept, 3)
    assert state["row_var"].shape == (6, 1) and state["col_var"].shape == (1, 40)
    tall, _, optimizer = _run(lambda ps: Flora(ps, lr=1e-2, rank=3, project=project), (40, 6), steps=1)
    assert optimizer.state[tall]["momentum"].shape == (kept, 3)


@pytest.mark.parametrize("project", ["smaller", "larger"])
def test_first_momentum_is_the_gradient_projected_on_the_chosen_side(project):
    # one step from zero: M = (1 - beta1) * (G compressed on the chosen side), written out here
    for shape in ((6, 40), (40, 6)):
        matrix, _, optimizer = _run(lambda ps: Flora(ps, lr=1e-2, rank=3, beta1=0.9, base="adamw", seed=4,
                                                     project=project, **PAPER_ALG2), shape, steps=1)
        generator = torch.Generator().manual_seed(1)  # the first gradient _run fed
        grad = torch.randn(shape, generator=generator).double()  # (rows, cols)
        rows, cols = shape
        project_rows = rows < cols if project == "smaller" else rows > cols
        projection = random_projection(derive_seed(4, 0, 0), rows if project_rows else cols, 3,
                                       dtype=torch.float64)  # (r, projected side)
        compressed = (projection @ grad).T if project_rows else grad @ projection.T  # (kept side, r)
        torch.testing.assert_close(optimizer.state[matrix]["momentum"].double(), 0.1 * compressed, rtol=1e-5,
                                   atol=1e-6)


def test_side_is_in_the_state_dict_and_a_mismatching_resume_fails():
    _, _, larger = _run(lambda ps: Flora(ps, lr=1e-2, rank=3, project="larger"), (6, 40), steps=2)
    buffer = io.BytesIO()
    torch.save(larger.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["param_groups"][0]["project"] == "larger"
    smaller = _run(lambda ps: Flora(ps, lr=1e-2, rank=3), (6, 40), steps=0)[2]
    with pytest.raises(ValueError) as info:
        smaller.load_state_dict(saved)
    message = str(info.value)
    assert "project='larger'" in message and "project='smaller'" in message and "\n" not in message
    # states saved before the option existed were built on the larger side
    legacy = {**saved, "param_groups": [{k: v for k, v in g.items() if k != "project"} for g in saved["param_groups"]]}
    with pytest.raises(ValueError, match="project='larger'"):
        smaller.load_state_dict(legacy)
    resumed = _run(lambda ps: Flora(ps, lr=1e-2, rank=3, project="larger"), (6, 40), steps=0)[2]
    resumed.load_state_dict(legacy)
    assert resumed.param_groups[0]["project"] == "larger"
    with pytest.raises(ValueError, match="project='left'") as info:
        Flora([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-2, rank=2, project="left")
    assert "\n" not in str(info.value)


def test_which_parameters_keep_full_state():
    torch.manual_seed(0)
    model = build_model(build_config("llama-tiny", vocab_size=256))
    optimizer = Flora(model, lr=1e-2, rank=8)
    compressed = {n for n, p in model.named_parameters() for g in optimizer.param_groups
                  if g["compress"] and any(p is q for q in g["params"])}
    assert compressed and all(n.rsplit(".", 2)[-2].endswith("proj") for n in compressed)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in compressed)
    # the shape rule: rank >= the projected side saves nothing -> full state
    assert compression_plan((6, 10), 6) is None and compression_plan((6, 10), 5) is not None
    assert compression_plan((6, 10), 10, project="larger") is None
    assert compression_plan((6, 10), 9, project="larger") is not None
    assert compression_plan((10,), 2) is None and compression_plan((3, 4, 5), 2) is None
    small, _, optimizer = _run(lambda ps: Flora(ps, lr=1e-2, rank=16), (6, 10), steps=1)
    assert "seed" not in optimizer.state[small] and optimizer.state[small]["momentum"].shape == (6, 10)


def test_blockwise_8bit_quantiser_against_fp32():
    torch.manual_seed(0)
    values = torch.randn(1000) * torch.logspace(-4, 0, 1000)  # wide dynamic range, like Adam moments
    codes, absmax = quantize_blockwise(values, signed=True)
    assert codes.dtype == torch.int8 and absmax.shape == (4,)
    restored = dequantize_blockwise(codes, absmax)
    block_absmax = absmax.repeat_interleave(256)[:1000]
    assert ((restored - values).abs() <= block_absmax * (1 / 127)).all()
    squares = values**2
    codes, absmax = quantize_blockwise(squares, signed=False)
    assert codes.dtype == torch.uint8
    restored = dequantize_blockwise(codes, absmax)
    assert (restored >= 0).all()
    big = squares > 1e-3 * absmax.repeat_interleave(256)[:1000]
    relative = ((restored - squares).abs() / squares)[big]
    assert relative.max() < 0.15  # companding keeps relative precision of mid-sized second moments
    with pytest.raises(ValueError, match="negative"):
        quantize_blockwise(values, signed=False)


def test_flora_8bit_momentum_tracks_fp32_path():
    fp32 = _run(lambda ps: Flora(ps, lr=1e-2, rank=8, kappa=3), (16, 300), steps=6)
    eight = _run(lambda ps: Flora(ps, lr=1e-2, rank=8, kappa=3, eight_bit=True), (16, 300), steps=6)
    state = eight[2].state[eight[0]]
    assert state["momentum_codes"].dtype == torch.int8 and "momentum" not in state
    start = _run(lambda ps: Flora(ps, lr=1e-2, rank=8), (16, 300), steps=0)[0]
    moved_fp32, moved_8bit = (fp32[0] - start).detach(), (eight[0] - start).detach()
    assert (moved_8bit - moved_fp32).norm() < 0.05 * moved_fp32.norm()
