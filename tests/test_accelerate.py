"""accelerate: FLoRA compressed accumulation inside ``Accelerator.accumulate`` after ``accelerator.prepare``.

At full rank with orthonormal projections the compressed round trip is exact, so it must reproduce
plain accumulation; at low rank it must differ (the accumulator is really in the loop) while holding
(k × r) buffers instead of full gradients.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402

from velora import VeLoRAConfig, apply_velora  # noqa: E402
from velora.optim import CompressedGradAccumulator, projectable_parameters  # noqa: E402
from velora.training.models import build_config, build_model  # noqa: E402

VOCAB, SEQ, ACCUMULATION, STEPS = 256, 16, 3, 2


def _run(compress_rank: int | None, full_rank: bool = False):
    """Two optimizer steps of 3 micro-batches; returns (grads at each step, final params, accumulator)."""
    torch.manual_seed(0)
    model = apply_velora(build_model(build_config("llama-tiny", vocab_size=VOCAB)), VeLoRAConfig(sub_token_size=32))
    ids = torch.randint(0, VOCAB, (ACCUMULATION * STEPS * 2, SEQ), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2, shuffle=False)
    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, cpu=True)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5), loader)
    accumulator = None
    if compress_rank is not None:
        accumulator = CompressedGradAccumulator(model, rank=compress_rank, accumulation_steps=ACCUMULATION, seed=3,
                                                orthogonal=full_rank, force_compress=full_rank)
    matrices = projectable_parameters(model)
    step_grads, freed = [], []
    for (batch,) in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                step_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            else:
                freed.append(all(p.grad is None for p in matrices))  # compressed: no full .grad between
            optimizer.step()
            optimizer.zero_grad()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    if accumulator is not None:
        accumulator.remove()
    return step_grads, params, accumulator, freed


@pytest.fixture(scope="module")
def plain():
    return _run(None)


def test_compressed_accumulation_equals_plain_at_full_rank(plain):
    plain_grads, plain_params, _, plain_freed = plain
    full_rank = max(max(p.shape) for p in projectable_parameters(build_model(build_config("llama-tiny"))))
    grads, params, accumulator, freed = _run(full_rank, full_rank=True)
    assert len(grads) == len(plain_grads) == STEPS
    assert all(freed) and not any(plain_freed)  # the accumulator held the micro-batch gradients
    assert int(accumulator.cycles.max()) == STEPS and accumulator.cycle_complete
    for step in range(STEPS):
        for name, expected in plain_grads[step].items():
            torch.testing.assert_close(grads[step][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    for name, expected in plain_params.items():
        torch.testing.assert_close(params[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_low_rank_accumulation_compresses_and_differs(plain):
    plain_grads, _, _, _ = plain
    grads, _, accumulator, freed = _run(4)
    assert all(freed)
    assert accumulator.buffer_bytes() * 10 < accumulator.naive_buffer_bytes()
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(grads[0][down], plain_grads[0][down], atol=1e-4)
    # uncompressed parameters (norms, embeddings) still accumulate exactly
    torch.testing.assert_close(grads[0]["model.norm.weight"], plain_grads[0]["model.norm.weight"],
                               rtol=1e-5, atol=1e-7)
