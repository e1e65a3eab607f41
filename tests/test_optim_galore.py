"""GaLoreAdamW: AdamW reference, independent projected reference, moment re-projection, robust SVD."""

from __future__ import annotations

import pytest
import torch

from velora.optim import GaLoreAdamW, svd_projector

torch.set_num_threads(1)


def _fixed_grads(shape, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def _train(optimizer, params, grads_per_param):
    for step_grads in zip(*grads_per_param):
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        optimizer.step()


def _params(shapes, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]


def test_without_projected_groups_is_torch_adamw_bitwise():
    shapes = [(6, 10), (10,)]
    grads = [_fixed_grads(s, 6, seed=i) for i, s in enumerate(shapes)]
    ours = _params(shapes)
    _train(GaLoreAdamW(ours, lr=1e-2, weight_decay=0.1), ours, grads)
    reference = _params(shapes)
    _train(torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1), reference, grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def _reference_galore(param, grads, rank, gap, scale, lr, side, betas=(0.9, 0.999), eps=1e-8):
    """A direct transcription of GaLore with Adam (no re-projection), written independently."""
    weight = param.detach().clone()
    exp_avg = exp_avg_sq = projector = None
    for step, grad in enumerate(grads, start=1):
        if (step - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(grad, full_matrices=False)
            projector = u[:, :rank] if side == "left" else vh[:rank].T
        low = projector.T @ grad if side == "left" else grad @ projector
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * low
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * low * low
        m_hat = exp_avg / (1 - betas[0] ** step)
        v_hat = exp_avg_sq / (1 - betas[1] ** step)
        normalized = m_hat / (v_hat.sqrt() + eps)
        full = projector @ normalized if side == "left" else normalized @ projector.T
        weight = weight - lr * scale * full
    return weight


@pytest.mark.parametrize("shape, proj_type, side", [
    ((6, 12), "std", "left"), ((12, 6), "std", "right"), ((6, 12), "right", "right"), ((12, 6), "left", "left"),
])
def test_projected_step_matches_reference(shape, proj_type, side):
    grads = _fixed_grads(shape, 7)
    (param,) = _params([shape])
    reference = _reference_galore(param, grads, rank=3, gap=3, scale=0.25, lr=1e-2, side=side)
    optimizer = GaLoreAdamW([dict(params=[param], rank=3, update_proj_gap=3, scale=0.25, proj_type=proj_type)],
                            lr=1e-2)
    _train(optimizer, [param], [grads])
    torch.testing.assert_close(param.detach(), reference, rtol=1e-5, atol=1e-6)
    projector = optimizer.state[param]["projector"]
    assert projector.shape == ((shape[0], 3) if side == "left" else (shape[1], 3))


def _momentum_in_full_space(optimizer, param):
    state = optimizer.state[param]
    return state["projector"] @ state["exp_avg"]  # left projection: (n, r) @ (r, m)


@pytest.mark.parametrize("reproject", [True, False])
def test_reprojected_moments_follow_the_subspace(reproject):
    # gradients B @ C_t share the column space of B (rank 3): every refreshed projector spans it, so
    # with re-projection the decompressed first moment equals AdamW's exactly; without, it does not
    n, m, rank = 8, 16, 3
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(n, rank, generator=generator)
    grads = [basis @ torch.randn(rank, m, generator=generator) for _ in range(8)]
    (param,) = _params([(n, m)])
    (reference,) = _params([(n, m)])
    optimizer = GaLoreAdamW([dict(params=[param], rank=rank, update_proj_gap=2, reproject_moments=reproject)],
                            lr=1e-2)
    adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.0)
    mismatch = []
    for grad in grads:
        param.grad, reference.grad = grad.clone(), grad.clone()
        optimizer.step()
        adamw.step()
        difference = (_momentum_in_full_space(optimizer, param) - adamw.state[reference]["exp_avg"]).abs().max()
        mismatch.append(difference.item())
    if reproject:
        assert max(mismatch) < 1e-5
    else:
        assert max(mismatch) > 1e-2  # GaLore's behaviour: moments expressed in a stale basis


def test_projector_is_a_tensor_refreshed_every_gap():
    (param,) = _params([(6, 12)])
    grads = _fixed_grads((6, 12), 7)
    optimizer = GaLoreAdamW([dict(params=[param], rank=2, update_proj_gap=3)], lr=1e-2)
    seen = []
    for grad in grads:
        param.grad = grad
        optimizer.step()
        seen.append(optimizer.state[param]["projector"].clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert changed == [False, False, True, False, False, True]  # refreshed at steps 3 and 6 (0-based)
    assert all(isinstance(v, torch.Tensor) for v in optimizer.state[param].values())


def test_failed_svd_is_retried_and_never_silent(monkeypatch):
    matrix = torch.randn(6, 10)
    expected = torch.linalg.svd(matrix.double(), full_matrices=False)[0][:, :2].float()
    real_svd = torch.linalg.svd
    calls = []

    def flaky_svd(tensor, *args, **kwargs):
        calls.append(tensor.dtype)
        if tensor.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated gesdd convergence failure")
        return real_svd(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    projector = svd_projector(matrix, 2, "left")
    assert calls == [torch.float32, torch.float64]
    torch.testing.assert_close(projector, expected)

    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(RuntimeError, match="failed in every attempt"):
        svd_projector(matrix, 2, "left")
    monkeypatch.setattr(torch.linalg, "svd", real_svd)
    with pytest.raises(ValueError, match="NaN/inf"):
        svd_projector(torch.full((4, 4), float("nan")), 2, "left")
    (param,) = _params([(6, 10)])
    optimizer = GaLoreAdamW([dict(params=[param], rank=2)], lr=1e-2)
    param.grad = torch.full((6, 10), float("inf"))
    with pytest.raises(ValueError, match="NaN/inf"):
        optimizer.step()


def test_8bit_tracks_fp32_path():
    shape = (16, 300)
    grads = _fixed_grads(shape, 6)
    start = _params([shape])[0].detach().clone()
    results = {}
    for eight_bit in (False, True):
        (param,) = _params([shape])
        optimizer = GaLoreAdamW([dict(params=[param], rank=4, update_proj_gap=3)], lr=1e-2, eight_bit=eight_bit)
        _train(optimizer, [param], [grads])
        results[eight_bit] = (param.detach() - start, optimizer.state[param])
    assert results[True][1]["exp_avg_codes"].dtype == torch.int8
    assert results[True][1]["exp_avg_sq_codes"].dtype == torch.uint8
    moved_fp32, moved_8bit = results[False][0], results[True][0]
    assert (moved_8bit - moved_fp32).norm() < 0.05 * moved_fp32.norm()
