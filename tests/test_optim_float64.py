"""Flora and GaLoreAdamW on float64 parameters compute in float64, against float64 references.

(16-bit parameters keep the float32 working precision; tests/test_optim_conformance.py checks that path.)
"""

from __future__ import annotations

import pytest
import torch

from velora.optim import Flora, GaLoreAdamW, derive_seed, random_projection
from velora.optim.flora import PAPER_ALG2

torch.set_num_threads(1)
F64 = dict(rtol=1e-12, atol=1e-14)


def _run(make, shape=(6, 10), steps=5):
    """A matrix and a bias in float64 trained on fixed random float64 gradients."""
    torch.manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(shape[1], dtype=torch.float64))
    optimizer = make([matrix, bias])
    generator = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(steps):
        matrix.grad = torch.randn(shape, generator=generator, dtype=torch.float64)
        bias.grad = torch.randn(shape[1], generator=generator, dtype=torch.float64)
        grads.append(matrix.grad.clone())
        optimizer.step()
    return matrix, bias, optimizer, grads


def test_flora_without_momentum_is_float64_torch_adafactor():
    flora = _run(lambda ps: Flora(ps, lr=1e-2, rank=4, beta1=0.0, weight_decay=0.1))
    reference = _run(lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.1))
    assert flora[0].dtype == torch.float64
    torch.testing.assert_close(flora[0], reference[0], **F64)
    torch.testing.assert_close(flora[1], reference[1], **F64)


@pytest.mark.parametrize("base", ["adafactor", "adamw"])
def test_flora_compressed_momentum_is_float64(base):
    # one step from zero: M = (1 - beta1) * G A^T with A the seed's projection in float64, written out here
    matrix, _, optimizer, grads = _run(lambda ps: Flora(ps, lr=1e-2, rank=3, base=base, seed=4, **PAPER_ALG2), (6, 40),
                                       steps=1)
    momentum = optimizer.state[matrix]["momentum"]
    projection = random_projection(derive_seed(4, 0, 0), 6, 3, dtype=torch.float64)  # (r, rows): rows < cols
    assert momentum.dtype == torch.float64
    torch.testing.assert_close(momentum, 0.1 * (projection @ grads[0]).T, **F64)


def test_flora_full_orthogonal_projection_matches_float64_adamw():
    flora = _run(lambda ps: Flora(ps, lr=1e-2, rank=10, kappa=2, base="adamw", orthogonal=True, weight_decay=0.1,
                                  force_compress=True, momentum="gradient"), steps=6)
    adamw = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), steps=6)
    # the projection's rows are orthonormal to float32 precision (drawn in float32 on every rank)
    torch.testing.assert_close(flora[0], adamw[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(flora[1], adamw[1], **F64)  # the bias keeps a full moment


def _galore_reference(matrix0, grads, lr, rank, gap, scale, betas=(0.9, 0.999), eps=1e-8):
    """GaLore written out in float64: left projection (rows < cols) on the top-rank singular vectors."""
    weight = matrix0.clone()
    exp_avg = exp_avg_sq = projector = None
    for step, grad in enumerate(grads, start=1):
        if (step - 1) % gap == 0:
            projector = torch.linalg.svd(grad, full_matrices=False)[0][:, :rank]  # (n, r)
        low = projector.T @ grad  # (r, m)
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * low
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * low * low
        adam = (exp_avg / (1 - betas[0] ** step)) / ((exp_avg_sq / (1 - betas[1] ** step)).sqrt() + eps)
        weight = weight - lr * scale * projector @ adam  # (n, m)
    return weight


def test_galore_float64_matches_a_float64_reference():
    torch.manual_seed(0)
    start = torch.randn(6, 10, dtype=torch.float64)
    galore = _run(lambda ps: GaLoreAdamW([dict(params=ps[:1], rank=3, update_proj_gap=2, scale=0.25),
                                          dict(params=ps[1:])], lr=1e-2), steps=5)
    assert galore[2].state[galore[0]]["projector"].dtype == torch.float64
    expected = _galore_reference(start, galore[3], lr=1e-2, rank=3, gap=2, scale=0.25)
    torch.testing.assert_close(galore[0].detach(), expected, **F64)
    adamw = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), steps=5)
    torch.testing.assert_close(galore[1], adamw[1], rtol=0, atol=0)  # the plain group is AdamW bit for bit
