"""CompressedGradAccumulator.compressed_grad: what a DDP communication hook receives instead of reading the
accumulator's internals (the (k, r) sum and projection whose decompression is .grad)."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import lm_loss, toy_batch, toy_model

from velora.optim import CompressedGradAccumulator
from velora.optim.projections import compress, decompress

torch.set_num_threads(1)
STEPS = 3


def _per_micro_batch_grads() -> list[dict[str, torch.Tensor]]:
    """Plain autograd gradients of each micro-batch on its own (the independent reference)."""
    model = toy_model()
    grads = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        tokens = toy_batch(step)
        lm_loss(model(tokens), tokens).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return grads


def _handed_over(reduction: str):
    """Train one cycle; a hook registered after the accumulator's records what compressed_grad hands over in the
    last micro-batch, as a DDP comm hook (which runs after the post-accumulate hooks) would see it."""
    model = toy_model()
    acc = CompressedGradAccumulator(model, rank=4, accumulation_steps=STEPS, seed=3, reduction=reduction)
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[str, tuple] = {}

    def record(param: torch.Tensor) -> None:
        if acc.compresses(param) and int(acc.micro_batches) == STEPS - 1:
            handoff = acc.compressed_grad(param)
            seen[names[id(param)]] = (handoff, param.grad.clone())

    for param in acc.params:
        param.register_post_accumulate_grad_hook(record)
    for step in range(STEPS):
        tokens = toy_batch(step)
        lm_loss(model(tokens), tokens).backward()
    return acc, model, seen


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_compressed_grad_is_the_exact_sum_of_projected_micro_batch_gradients(reduction):
    acc, model, seen = _handed_over(reduction)
    reference = _per_micro_batch_grads()
    compressed_names = [n for n, p in model.named_parameters() if acc.compresses(p)]
    assert compressed_names and sorted(seen) == sorted(compressed_names)
    for name, ((plan, summed, projection), grad_then) in seen.items():
        expected = sum(compress(g[name], projection, plan.transposed) for g in reference)  # (k, r)
        if reduction == "mean":
            expected = expected / STEPS
        assert summed.shape == (plan.kept_dim, plan.rank)
        torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-6, msg=name)
        # what the hook decompresses after the all-reduce is, in one process, what .grad held (bitwise for a sum;
        # a mean divides before instead of after the decompression)
        restored = decompress(summed, projection, plan.transposed)  # (n, m)
        if reduction == "sum":
            assert torch.equal(restored, grad_then), name
        torch.testing.assert_close(restored, grad_then, rtol=1e-6, atol=1e-7, msg=name)
    # the cycle closed: buffers are empty again and the next cycle uses a new projection
    assert acc.cycle_complete and all(b is None or not b.any() for b in acc.buffers)


def test_compressed_grad_refuses_the_middle_of_a_cycle_and_uncompressed_parameters():
    model = toy_model()
    acc = CompressedGradAccumulator(model, rank=4, accumulation_steps=STEPS)
    tokens = toy_batch(0)
    lm_loss(model(tokens), tokens).backward()  # micro-batch 1 of 3
    matrix = next(p for p in acc.params if acc.compresses(p))
    with pytest.raises(ValueError, match="middle of an accumulation cycle; run every micro-batch but the last"):
        acc.compressed_grad(matrix)
    vector = next(p for p in acc.params if p.dim() == 1)
    assert not acc.compresses(vector) and not acc.compresses(torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"shape \(\d+,\) is not compressed by this accumulator"):
        acc.compressed_grad(vector)
