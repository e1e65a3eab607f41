"""CompressedGradAccumulator (FLoRA Alg. 1): exactness, memory, boundary gating, resume, hooks."""

from __future__ import annotations

import io

import pytest
import torch
from optim_helpers import lm_loss, toy_batch, toy_model

from velora.optim import CompressedGradAccumulator, Flora, random_projection
from velora.training.models import build_config, build_model

torch.set_num_threads(1)


def _micro_batches(model, steps: range, scale: float = 1.0) -> None:
    for step in steps:
        tokens = toy_batch(step)
        (lm_loss(model(tokens), tokens) * scale).backward()


def _plain_grads(steps: range, scale: float = 1.0) -> dict[str, torch.Tensor]:
    model = toy_model()
    _micro_batches(model, steps, scale)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reduction, project", [("sum", "smaller"), ("mean", "smaller"), ("sum", "larger")])
def test_full_rank_orthogonal_equals_plain_accumulation(reduction, project):
    model = toy_model()
    # rank 40 >= every projected dimension (either side of each matrix): compression is exact
    acc = CompressedGradAccumulator(model.parameters(), rank=40, accumulation_steps=3, seed=5,
                                    reduction=reduction, orthogonal=True, project=project, force_compress=True)
    assert all(plan is not None for p, plan in zip(acc.params, acc.plans) if p.dim() == 2)
    _micro_batches(model, range(3))
    expected = _plain_grads(range(3), scale=1.0 if reduction == "sum" else 1 / 3)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert acc.cycle_complete
    # second cycle with a new projection is exact too
    model.zero_grad(set_to_none=True)
    _micro_batches(model, range(3, 6))
    expected = _plain_grads(range(3, 6), scale=1.0 if reduction == "sum" else 1 / 3)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("project", ["smaller", "larger"])
def test_small_rank_memory_is_r_over_n_and_full_grads_are_freed(project):
    model = toy_model()
    rank = 4
    acc = CompressedGradAccumulator(model.parameters(), rank=rank, accumulation_steps=4, project=project)
    _micro_batches(model, range(2))  # mid-cycle
    counted = 0
    for param, plan, buffer in zip(acc.params, acc.plans, acc.buffers):
        if plan is None:
            assert param.grad is not None  # plain accumulation for vectors
            continue
        assert param.grad is None  # the full gradient does not exist between micro-batches
        rows, cols = param.shape
        kept, projected = (max(rows, cols), min(rows, cols)) if project == "smaller" else (min(rows, cols),
                                                                                             max(rows, cols))
        assert buffer.shape == (kept, rank)
        # per matrix: r / n of the naive buffer, n = the projected side
        assert buffer.numel() * buffer.element_size() * projected == param.numel() * 4 * rank
        counted += buffer.numel() * buffer.element_size()
    assert counted == acc.buffer_bytes()
    naive = sum(p.numel() * 4 for p, plan in zip(acc.params, acc.plans) if plan is not None)
    # the toy's matrices have min side 16, max side 32..40: r=4 keeps <= 1/4 of them either way
    assert acc.naive_buffer_bytes() == naive and counted <= naive / 4


def _reference_round_trip(grad_sum: torch.Tensor, seed: int, rank: int, project: str, orthogonal: bool):
    """Aᵀ A G (rows projected) or G Aᵀ A (columns projected), written out from the definition."""
    rows, cols = grad_sum.shape
    project_rows = rows < cols if project == "smaller" else rows > cols
    side = rows if project_rows else cols
    projection = random_projection(seed, side, rank, dtype=torch.float64, orthogonal=orthogonal)  # (r, side)
    if project_rows:
        return projection.T @ (projection @ grad_sum)  # (rows, r) @ (r, cols)
    return (grad_sum @ projection.T) @ projection  # (rows, r) @ (r, cols)


def _wide_and_tall(dtype=torch.float64) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 20, dtype=dtype)), torch.nn.Parameter(torch.randn(20, 6, dtype=dtype)),
            torch.nn.Parameter(torch.randn(12, 12, dtype=dtype))]


def _feed(params, micro_grads) -> None:
    # loss = sum(W * X) has gradient exactly X: the hooks see known gradients
    for grads in micro_grads:
        sum((param * grad).sum() for param, grad in zip(params, grads)).backward()


@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize("project", ["smaller", "larger"])
def test_decompressed_sum_is_the_chosen_side_projection_in_fp64(project, orthogonal):
    params = _wide_and_tall()
    generator = torch.Generator().manual_seed(1)
    micro_grads = [[torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
                   for _ in range(3)]
    rank = 3
    acc = CompressedGradAccumulator(params, rank=rank, accumulation_steps=3, seed=11, project=project,
                                    orthogonal=orthogonal)
    assert all(b.dtype == torch.float64 for b in acc.buffers)
    _feed(params, micro_grads)
    assert acc.cycle_complete
    for index, param in enumerate(params):
        grad_sum = sum(grads[index] for grads in micro_grads)  # (rows, cols)
        expected = _reference_round_trip(grad_sum, acc.seed_for(index, 0), rank, project, orthogonal)
        torch.testing.assert_close(param.grad, expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(param.grad, grad_sum, atol=1e-3)  # r=3 < 6: really compressed
        # the two kinds of rows are different estimators of the same sum
        assert not torch.allclose(param.grad, _reference_round_trip(grad_sum, acc.seed_for(index, 0), rank, project,
                                                                    not orthogonal), atol=1e-3)
    # the two sides are different estimators of the same wide/tall sum
    other = "larger" if project == "smaller" else "smaller"
    grad_sum = sum(grads[0] for grads in micro_grads)
    assert not torch.allclose(params[0].grad, _reference_round_trip(grad_sum, acc.seed_for(0, 0), rank, other,
                                                                    orthogonal), atol=1e-3)


def test_default_rows_are_orthonormal_with_the_smaller_reconstruction_error_the_theory_gives():
    """The default accumulator draws orthonormal rows; over many cycles its decompressed sum misses a fixed G by
    (p / r - 1) ||G||^2 on average, against (p + 1) / r ||G||^2 for the paper's Gaussian rows (p = 32, r = 8:
    3.0 vs 4.125), both unbiased."""
    p, k, r, cycles = 32, 48, 8, 600
    grad = torch.randn(k, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    energy = float(grad.pow(2).sum())
    measured = {}
    for orthogonal in (None, False):  # None: the default
        param = torch.nn.Parameter(torch.zeros(k, p, dtype=torch.float64))
        kind = {} if orthogonal is None else {"orthogonal": orthogonal}
        acc = CompressedGradAccumulator([param], rank=r, accumulation_steps=1, seed=5, **kind)
        assert acc.orthogonal is (orthogonal is None)  # the default draws orthonormal rows
        errors, total = [], torch.zeros_like(grad)
        for _ in range(cycles):
            param.grad = None
            _feed([param], [[grad]])  # one micro-batch = one cycle; the hook leaves the decompressed G in .grad
            errors.append(float((param.grad - grad).pow(2).sum()) / energy)
            total += param.grad
        measured[orthogonal] = (sum(errors) / cycles, total / cycles)
    assert measured[None][0] == pytest.approx(p / r - 1, rel=0.03)  # orthonormal rows: a small spread per draw
    assert measured[False][0] == pytest.approx((p + 1) / r, rel=0.1)
    for orthogonal, (_, mean) in measured.items():  # unbiased: the mean over cycles tends to G
        assert float((mean - grad).pow(2).sum()) / energy < 3 * (measured[orthogonal][0] / cycles)


@pytest.mark.parametrize("project, rank", [("smaller", 6), ("larger", 20)])
def test_orthogonal_rank_equal_to_projected_side_recovers_the_sum_exactly(project, rank):
    params = _wide_and_tall()[:2]
    generator = torch.Generator().manual_seed(2)
    micro_grads = [[torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
                   for _ in range(2)]
    acc = CompressedGradAccumulator(params, rank=rank, accumulation_steps=2, orthogonal=True, project=project,
                                    force_compress=True)
    assert [plan.projected_dim for plan in acc.plans] == [rank, rank]
    _feed(params, micro_grads)
    for index, param in enumerate(params):
        # A is orthonormalised in float32 (bit-identical on every device), so AᵀA = I to float32 precision
        torch.testing.assert_close(param.grad, micro_grads[0][index] + micro_grads[1][index], rtol=1e-5,
                                   atol=1e-5)


def test_side_choice_is_saved_and_a_mismatching_resume_fails():
    params = _wide_and_tall(torch.float32)
    larger = CompressedGradAccumulator(params, rank=3, accumulation_steps=2, project="larger")
    buffer = io.BytesIO()
    torch.save(larger.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["project"] == "larger"
    larger.remove()
    smaller = CompressedGradAccumulator(params, rank=3, accumulation_steps=2)  # default: smaller side
    with pytest.raises(ValueError) as info:
        smaller.load_state_dict(saved)
    message = str(info.value)
    assert "project='larger'" in message and "project='smaller'" in message and "\n" not in message
    legacy = {k: v for k, v in saved.items() if k != "project"}  # written before the option: larger side
    with pytest.raises(ValueError, match="project='larger'"):
        smaller.load_state_dict(legacy)
    smaller.remove()
    again = CompressedGradAccumulator(params, rank=3, accumulation_steps=2, project="larger")
    again.load_state_dict(legacy)


def test_projection_kind_is_saved_and_a_mismatching_resume_fails():
    params = _wide_and_tall(torch.float64)
    gaussian = CompressedGradAccumulator(params, rank=3, accumulation_steps=2, orthogonal=False)
    _feed(params, [[torch.ones(p.shape, dtype=torch.float64) for p in params]])  # one of two micro-batches: open
    buffer = io.BytesIO()
    torch.save(gaussian.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["orthogonal"] is False and bool((saved["counts"] != 0).any())
    gaussian.remove()
    default = CompressedGradAccumulator(params, rank=3, accumulation_steps=2)  # orthonormal
    with pytest.raises(ValueError) as info:
        default.load_state_dict(saved)
    message = str(info.value)
    assert "orthogonal=False" in message and "orthogonal=True" in message and "\n" not in message
    # a state from before the kind was recorded: refused inside an open cycle, accepted between cycles
    legacy = {k: v for k, v in saved.items() if k != "orthogonal"}
    with pytest.raises(ValueError, match="open accumulation cycle"):
        default.load_state_dict(legacy)
    default.load_state_dict({**legacy, "counts": torch.zeros_like(legacy["counts"]),
                             "buffers": {i: torch.zeros_like(b) for i, b in legacy["buffers"].items()},
                             "plain_grads": {}})
    default.remove()
    again = CompressedGradAccumulator(params, rank=3, accumulation_steps=2, orthogonal=False)
    again.load_state_dict(saved)
    assert torch.equal(again.counts, saved["counts"])


def test_boundary_gated_and_new_projection_per_cycle():
    model = toy_model()
    optimizer = Flora(model.parameters(), lr=1e-2, rank=4)
    acc = CompressedGradAccumulator(model.parameters(), rank=4, accumulation_steps=3)
    index = next(i for i, plan in enumerate(acc.plans) if plan is not None)
    projections, boundaries = [acc.projection(index)], 0
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(6):
        _micro_batches(model, range(step, step + 1))
        if not acc.cycle_complete:
            # nothing may step in the middle of a cycle, and no parameter has moved
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            continue
        boundaries += 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        projections.append(acc.projection(index))
        before = [p.detach().clone() for p in model.parameters()]
    assert boundaries == 2
    assert all(int(s["step"]) == 2 for s in optimizer.state.values())
    assert not torch.equal(projections[0], projections[1]) and not torch.equal(projections[1], projections[2])


def _train_with_accumulator(model, acc, optimizer, micro_steps: range) -> None:
    for step in micro_steps:
        _micro_batches(model, range(step, step + 1))
        if acc.cycle_complete:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def test_mid_cycle_resume_is_bitwise():
    def build():
        model = toy_model()
        return model, Flora(model.parameters(), lr=1e-2, rank=4, kappa=2), \
            CompressedGradAccumulator(model.parameters(), rank=4, accumulation_steps=3, seed=3)

    model_a, optimizer_a, acc_a = build()
    _train_with_accumulator(model_a, acc_a, optimizer_a, range(11))

    model_b, optimizer_b, acc_b = build()
    _train_with_accumulator(model_b, acc_b, optimizer_b, range(7))  # 2 cycles + 1 micro-batch
    assert not acc_b.cycle_complete
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optimizer": optimizer_b.state_dict(),
                "accumulator": acc_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model_c, optimizer_c, acc_c = build()
    model_c.load_state_dict(saved["model"])
    optimizer_c.load_state_dict(saved["optimizer"])
    acc_c.load_state_dict(saved["accumulator"])
    _train_with_accumulator(model_c, acc_c, optimizer_c, range(7, 11))
    for (name, expected), actual in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(expected, actual), name


def test_flush_remove_and_model_rule():
    model = toy_model()
    with CompressedGradAccumulator(model, rank=4, accumulation_steps=5, orthogonal=True) as acc:
        _micro_batches(model, range(2))
        acc.flush()  # partial cycle: decompressed sums of 2 micro-batches
        assert acc.cycle_complete and all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    _micro_batches(model, range(2))  # hooks removed on exit: plain accumulation
    expected = _plain_grads(range(2))
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, expected[name]), name

    torch.manual_seed(0)
    llama = build_model(build_config("llama-tiny", vocab_size=256))
    acc = CompressedGradAccumulator(llama, rank=8, accumulation_steps=2)
    names = {id(p): n for n, p in llama.named_parameters()}
    compressed = {names[id(p)] for p, plan in zip(acc.params, acc.plans) if plan is not None}
    assert compressed and all(n.rsplit(".", 2)[-2].endswith("proj") for n in compressed)
    acc.remove()


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(rank=0, accumulation_steps=2), "rank=0"),
    (dict(rank=4, accumulation_steps=0), "accumulation_steps=0"),
    (dict(rank=4, accumulation_steps=2, reduction="max"), "reduction='max'"),
    (dict(rank=4, accumulation_steps=2, project="left"), "project='left'"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        CompressedGradAccumulator(toy_model(), **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no trainable parameters"):
        CompressedGradAccumulator([], rank=2, accumulation_steps=2)


def test_drives_accelerate_gradient_accumulation():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def run(with_accumulator: bool):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = accelerate.Accelerator(gradient_accumulation_steps=3, cpu=True)
        model = toy_model()
        optimizer = Flora(model.parameters(), lr=1e-2, rank=4)
        acc = None
        if with_accumulator:  # exact settings, so the run must match plain accelerate accumulation
            acc = CompressedGradAccumulator(model, rank=40, accumulation_steps=3, orthogonal=True,
                                            force_compress=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        for step in range(6):
            with accelerator.accumulate(model):
                tokens = toy_batch(step)
                accelerator.backward(lm_loss(model(tokens), tokens))
                if acc is not None:
                    assert acc.cycle_complete == accelerator.sync_gradients
                optimizer.step()  # accelerate skips it unless sync_gradients
                optimizer.zero_grad()
        steps = {int(s["step"]) for s in optimizer.optimizer.state.values()}
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return [p.detach().clone() for p in model.parameters()], steps

    compressed, steps = run(True)
    plain, plain_steps = run(False)
    assert steps == plain_steps == {2}
    for a, b in zip(compressed, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_drives_hf_trainer_gradient_accumulation(tmp_path):
    transformers = pytest.importorskip("transformers")
    examples = []
    for index in range(16):
        ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(index))
        examples.append({"input_ids": ids, "labels": ids})

    def run(with_accumulator: bool):
        torch.manual_seed(0)
        model = build_model(build_config("llama-tiny", vocab_size=256))
        acc = None
        if with_accumulator:  # exact settings: must match the Trainer's own accumulation (with clipping)
            acc = CompressedGradAccumulator(model, rank=1000, accumulation_steps=4, orthogonal=True,
                                            force_compress=True)
        optimizer = Flora(model, lr=1e-2, rank=8)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(with_accumulator)), per_device_train_batch_size=2,
            gradient_accumulation_steps=4, max_steps=2, max_grad_norm=1.0, report_to=[], save_strategy="no",
            use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, logging_strategy="no",
        )
        transformers.Trainer(model=model, args=args, train_dataset=examples, optimizers=(optimizer, None)).train()
        if acc is not None:  # the hooks really ran: two full compressed cycles, nothing pending
            assert acc.cycle_complete and int(acc.cycles.min()) == 2 and any(acc.plans)
        steps = {int(s["step"]) for s in optimizer.state.values()}
        return [p.detach().clone() for p in model.parameters()], steps

    compressed, steps = run(True)
    plain, plain_steps = run(False)
    assert steps == plain_steps == {2}
    for a, b in zip(compressed, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
