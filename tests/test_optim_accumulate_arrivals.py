"""CompressedGradAccumulator when parameters miss micro-batches (conditional layers, MoE experts, task heads).

Reference: plain accumulation, i.e. torch summing into ``.grad`` whatever arrived. Full rank with orthonormal
rows makes the compressed path exact up to the float32 orthonormality of the drawn rows (1e-7), so a difference
above the tolerance is a bookkeeping error (a missing, stale or mixed-in gradient is O(1)).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from velora.optim import CompressedGradAccumulator

torch.set_num_threads(1)

SHAPES = [(6, 20), (20, 6), (12, 12), (12,)]


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64)) for shape in SHAPES]


def _arrivals(seed: int, micro_batches: int) -> list[list[bool]]:
    """A random arrival pattern; every micro-batch reaches at least one parameter (that is what it counts by)."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.rand(micro_batches, len(SHAPES), generator=generator) < 0.5  # (micro, params)
    for row in pattern:
        if not row.any():
            row[int(torch.randint(len(SHAPES), (1,), generator=generator))] = True
    return pattern.tolist()


def _gradients(seed: int, micro: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 * seed + micro)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def _backward(params, arrived: list[bool], grads: list[torch.Tensor]) -> None:
    # loss = sum of <W, X> over the parameters that take part: exactly X arrives in their .grad
    sum((param * grad).sum() for param, grad, here in zip(params, grads, arrived) if here).backward()


def _plain_cycle_grads(pattern, seed: int, steps: int) -> list[list[torch.Tensor | None]]:
    """What plain accumulation leaves in .grad at each optimizer step (None: nothing arrived)."""
    params = _params()
    result = []
    for micro, arrived in enumerate(pattern):
        _backward(params, arrived, _gradients(seed, micro))
        if (micro + 1) % steps == 0:
            result.append([None if p.grad is None else p.grad.clone() for p in params])
            for param in params:
                param.grad = None
    return result


@pytest.mark.parametrize("loop", ["readme", "trainer"])
@pytest.mark.parametrize("seed", range(6))
def test_any_arrival_pattern_equals_plain_accumulation(seed, loop):
    steps, cycles = 3, 4
    pattern = _arrivals(seed, steps * cycles)
    pattern[0] = [True, False, True, True]  # parameter 1 skips micro-batch 1 of cycle 1
    pattern[steps - 1] = [False, True, True, False]  # parameters 0 and 3 skip the last one
    for micro in range(steps, 2 * steps):  # parameter 2 gets nothing in the whole of cycle 2
        pattern[micro][2] = False
        pattern[micro][0] = True
    expected = _plain_cycle_grads(pattern, seed, steps)
    params = _params()
    acc = CompressedGradAccumulator(params, rank=64, accumulation_steps=steps, seed=seed, orthogonal=True,
                                    force_compress=True)
    seen = []
    for micro, arrived in enumerate(pattern):
        _backward(params, arrived, _gradients(seed, micro))
        boundary = (micro + 1) % steps == 0
        assert acc.cycle_complete == boundary, micro  # the README loop steps exactly at the boundaries
        if (acc.cycle_complete if loop == "readme" else boundary):
            seen.append([None if p.grad is None else p.grad.clone() for p in params])
            for param in params:
                param.grad = None
    assert len(seen) == len(expected) == cycles
    for cycle, (got, want) in enumerate(zip(seen, expected)):
        for index, (actual, reference) in enumerate(zip(got, want)):
            if reference is None:
                assert actual is None, (cycle, index)
            else:
                torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6, msg=f"cycle {cycle} {index}")
    assert int(acc.cycles.min()) == cycles and acc.buffer_bytes() > 0
    assert all(not b.any() for b in acc.buffers if b is not None)  # nothing carried into the next cycle


def test_mean_and_flush_count_micro_batches_not_arrivals():
    params = _params()
    acc = CompressedGradAccumulator(params, rank=64, accumulation_steps=4, orthogonal=True, force_compress=True,
                                    reduction="mean")
    pattern = [[True, False, True, True], [False, True, True, False], [True, True, False, False]]
    reference = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    for micro, arrived in enumerate(pattern):
        grads = _gradients(7, micro)
        _backward(params, arrived, grads)
        for total, grad, here in zip(reference, grads, arrived):
            total += grad if here else 0
    assert not acc.cycle_complete
    acc.flush()  # 3 micro-batches: every sum is divided by 3, whatever arrived
    assert acc.cycle_complete
    for param, total in zip(params, reference):
        torch.testing.assert_close(param.grad, total / 3, rtol=1e-5, atol=1e-6)


class _Gated(torch.nn.Module):
    """Two experts; a micro-batch routes to a subset (an expert with no tokens gets no gradient)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(8, 16).double()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16).double() for _ in range(2))
        self.out = torch.nn.Linear(16, 4).double()

    def forward(self, x: torch.Tensor, route: list[int], reentrant: bool = False) -> torch.Tensor:
        hidden = torch.tanh(self.inp(x))  # (B, 16)
        for index in route:
            expert = self.experts[index]
            hidden = hidden + (checkpoint(expert, hidden, use_reentrant=True) if reentrant else expert(hidden))
        return self.out(hidden).square().mean()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gated_model_equals_plain_accumulation(reentrant):
    routes = [[0], [], [0, 1], [1], [1], [0]]  # expert 1 skips cycle 1 until its last micro-batch, ...

    def run(with_accumulator: bool):
        model = _Gated()
        acc = None
        if with_accumulator:
            acc = CompressedGradAccumulator(model, rank=64, accumulation_steps=3, orthogonal=True,
                                            force_compress=True)
        grads = []
        for micro, route in enumerate(routes):
            x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(micro))
            model(x, route, reentrant).backward()
            if (micro + 1) % 3 == 0:
                if acc is not None:
                    assert acc.cycle_complete  # a nested (reentrant) backward is not counted as a micro-batch
                grads.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
                model.zero_grad(set_to_none=True)
            elif acc is not None:
                assert not acc.cycle_complete
        return grads

    for got, want in zip(run(True), run(False), strict=True):
        assert got.keys() == want.keys()
        for name in want:
            if want[name] is None:
                assert got[name] is None, name
            else:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sparse_gradient_of_a_compressed_parameter_is_refused_in_one_line():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    acc = CompressedGradAccumulator([embedding.weight], rank=2, accumulation_steps=2)
    assert acc.plans[0] is not None
    with pytest.raises(ValueError) as info:
        embedding(torch.tensor([1, 2])).sum().backward()
    assert "sparse" in str(info.value) and "sparse=False" in str(info.value) and "\n" not in str(info.value)
