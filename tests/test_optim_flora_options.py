"""Flora's momentum options (issue #16): momentum="gradient"|"update", exact_current, Gaussian|orthonormal rows.

Each setting is checked in float64 against a reference written out below with plain torch ops: uncompressed
(full-rank orthonormal rows make the projection exact, so Flora must equal the algorithm it names) and
compressed at a low rank across a kappa boundary. Then the load kind check and the presets.
"""

from __future__ import annotations

import io
import math
from itertools import product

import pytest
import torch

from velora.optim import Flora, derive_seed, random_projection
from velora.optim.flora import AUTHORS_CODE, PAPER_ALG2

torch.set_num_threads(1)

LR, BETA1, BETA2, EPS, WEIGHT_DECAY, KAPPA, STEPS = 1e-2, 0.9, 0.999, 1e-8, 0.1, 3, 7
OPTIONS = list(product(("gradient", "update"), (False, True)))  # (momentum, exact_current)
BEST_MEASURED = {"momentum": "update", "exact_current": True, "orthogonal": True, "residual": False}  # the defaults


def _grads(shape, steps=STEPS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]


def _start(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _run_flora(shape, **options) -> tuple[torch.Tensor, Flora]:
    matrix = torch.nn.Parameter(_start(shape))
    optimizer = Flora([matrix], lr=LR, kappa=KAPPA, weight_decay=WEIGHT_DECAY, **options)
    for grad in _grads(shape):
        matrix.grad = grad.clone()
        optimizer.step()
    return matrix.detach(), optimizer


# --- the reference, written out ------------------------------------------------------------------------------

class _Adafactor:
    """torch.optim.Adafactor's factored second moment and step, for one matrix."""

    def __init__(self, shape):
        self.row, self.col = torch.zeros(shape[0], 1, dtype=torch.float64), torch.zeros(1, shape[1],
                                                                                        dtype=torch.float64)

    def inverse_root(self, grad, step):  # 1 / sqrt(v_hat), (n, m)
        decay, eps1 = step**-0.8, torch.finfo(torch.float64).eps
        self.row = (1 - decay) * self.row + decay * (grad * grad).mean(dim=1, keepdim=True)  # (n, 1)
        self.col = (1 - decay) * self.col + decay * (grad * grad).mean(dim=0, keepdim=True)  # (1, m)
        v_hat = self.row @ self.col / max(self.row.mean().item(), eps1)  # (n, m)
        return 1 / v_hat.clamp(min=eps1 * eps1).sqrt()

    @staticmethod
    def apply(weight, update, step, bias_correction1):
        scale = max(1e-3, weight.pow(2).mean().sqrt().item()) * min(LR, 1 / math.sqrt(step))
        clip = max(1.0, update.pow(2).mean().sqrt().item())
        return weight * (1 - LR * WEIGHT_DECAY) - scale / clip * update


class _AdamW:
    """Adam's second moment with bias correction, and the step with Flora's RMS clipping (never hit by exact Adam)."""

    def __init__(self, shape):
        self.exp_avg_sq = torch.zeros(shape, dtype=torch.float64)

    def inverse_root(self, grad, step):  # 1 / (sqrt(v_hat) + eps)
        self.exp_avg_sq = BETA2 * self.exp_avg_sq + (1 - BETA2) * grad * grad
        return 1 / (self.exp_avg_sq.sqrt() / math.sqrt(1 - BETA2**step) + EPS)

    @staticmethod
    def apply(weight, update, step, bias_correction1):
        clip = max(1.0, update.pow(2).mean().sqrt().item() / bias_correction1)
        return weight * (1 - LR * WEIGHT_DECAY) - LR / bias_correction1 / clip * update


def _reference(shape, base, momentum, exact_current, rank=None, orthogonal=False, seed=0, residual=False,
               kappa=KAPPA) -> torch.Tensor:
    """FLoRA momentum on one matrix; ``rank=None``: uncompressed momentum. Projects the smaller side. ``residual``:
    orthonormal rows Q (Q Q^T = I), and the complement of the direction's row space gets the source with the
    weight of an exact m_hat (AdamW: bias_correction1, as the step divides by it; Adafactor: 1)."""
    weight = _start(shape)
    second_moment = (_Adafactor if base == "adafactor" else _AdamW)(shape)
    transposed = shape[0] < shape[1]  # work on (k, p) with p the smaller side
    kept, projected = max(shape), min(shape)
    history = torch.zeros((kept, rank) if rank else (kept, projected), dtype=torch.float64)

    def draw(cycle):  # (r, p)
        drawn = random_projection(derive_seed(seed, 0, cycle), projected, rank, dtype=torch.float64,
                                  orthogonal=orthogonal)
        return drawn * math.sqrt(rank / projected) if residual else drawn

    projection = draw(0) if rank else None
    for t, grad in enumerate(_grads(shape)):
        step = t + 1
        bias_correction1 = 1 - BETA1**step if base == "adamw" else 1.0
        inverse_root = second_moment.inverse_root(grad, step)  # (n, m)
        source = grad if momentum == "gradient" else grad * inverse_root  # (n, m)
        source = source.T if transposed else source  # (k, p)
        if rank is None:
            history = BETA1 * history + (1 - BETA1) * source
            direction = history
        else:
            old = projection
            exact = BETA1 * history @ projection + (1 - BETA1) * source  # (k, p)
            if t > 0 and t % kappa == 0:
                new_projection = draw(t // kappa)
                history = history @ projection @ new_projection.T  # (k, r)
                projection = new_projection
            history = BETA1 * history + (1 - BETA1) * source @ projection.T  # (k, r)
            direction = exact if exact_current else history @ projection  # (k, p)
            if residual:  # exact_current: source + beta1 (M_old Q_old - source Q_old^T Q_old) on Adafactor
                rows = old if exact_current else projection
                share = bias_correction1 - (1 - BETA1 if exact_current else 0.0)  # the complement's missing weight
                direction = direction + share * (source - source @ rows.T @ rows)  # (k, p)
        direction = direction.T if transposed else direction  # (n, m)
        update = direction * inverse_root if momentum == "gradient" else direction
        weight = second_moment.apply(weight, update, step, bias_correction1)
    return weight


# --- against the reference -------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["adafactor", "adamw"])
@pytest.mark.parametrize("momentum, exact_current", OPTIONS)
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_full_rank_orthonormal_flora_is_the_uncompressed_algorithm_it_names(base, momentum, exact_current, shape):
    flora, optimizer = _run_flora(shape, rank=6, base=base, momentum=momentum, exact_current=exact_current,
                                  orthogonal=True, force_compress=True)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert "seed" in state  # the projection path
    assert all(value.dtype == torch.float64 for key, value in state.items() if key not in ("step", "seed"))
    expected = _reference(shape, base, momentum, exact_current)
    # projections are drawn in float32 and cast: orthonormal to ~1e-7
    torch.testing.assert_close(flora, expected, rtol=0, atol=1e-6)


def test_the_two_momentum_sources_are_different_algorithms():
    # guards the test above against a reference that cannot tell them apart
    shape = (6, 10)
    for base in ("adafactor", "adamw"):
        gradient = _reference(shape, base, "gradient", False)
        update = _reference(shape, base, "update", False)
        assert (gradient - update).abs().max() > 1e-3


@pytest.mark.parametrize("base", ["adafactor", "adamw"])
@pytest.mark.parametrize("momentum, exact_current", OPTIONS)
@pytest.mark.parametrize("orthogonal", [False, True])
def test_low_rank_flora_matches_the_written_out_compressed_algorithm(base, momentum, exact_current, orthogonal):
    shape = (6, 10)  # rows projected (the smaller side) at rank 3, kappa boundaries at steps 3 and 6
    flora, _ = _run_flora(shape, rank=3, base=base, momentum=momentum, exact_current=exact_current,
                          orthogonal=orthogonal)
    expected = _reference(shape, base, momentum, exact_current, rank=3, orthogonal=orthogonal)
    torch.testing.assert_close(flora, expected, rtol=1e-10, atol=1e-12)
    # the option changes the result at a low rank (it is not silently ignored)
    other = _reference(shape, base, momentum, not exact_current, rank=3, orthogonal=orthogonal)
    assert (flora - other).abs().max() > 1e-4


@pytest.mark.parametrize("base", ["adafactor", "adamw"])
@pytest.mark.parametrize("momentum, exact_current", OPTIONS)
def test_residual_flora_matches_the_written_out_algorithm_across_kappa(base, momentum, exact_current):
    shape = (10, 6)  # columns projected at rank 3, kappa boundaries at steps 3 and 6
    flora, _ = _run_flora(shape, rank=3, base=base, momentum=momentum, exact_current=exact_current,
                          orthogonal=True, residual=True)
    expected = _reference(shape, base, momentum, exact_current, rank=3, orthogonal=True, residual=True)
    torch.testing.assert_close(flora, expected, rtol=1e-10, atol=1e-12)
    plain = _reference(shape, base, momentum, exact_current, rank=3, orthogonal=True)
    assert (flora - plain).abs().max() > 1e-4  # the option is not silently ignored


@pytest.mark.parametrize("base", ["adafactor", "adamw"])
@pytest.mark.parametrize("momentum, exact_current", OPTIONS)
def test_residual_flora_is_the_exact_ema_inside_the_row_space_and_the_source_outside(base, momentum, exact_current):
    # no resampling in 7 steps: Flora's residual direction must be m_t P + c_t source_t (I - P), with m_t the
    # uncompressed EMA, P the projector onto the drawn rows (from a pseudo-inverse, not Flora's scaling) and c_t the
    # weight an exact m_hat gives the source where the EMA is absent (bias_correction1 for AdamW, 1 for Adafactor)
    shape, rank = (6, 10), 3
    matrix = torch.nn.Parameter(_start(shape))
    optimizer = Flora([matrix], lr=LR, rank=rank, kappa=100, weight_decay=WEIGHT_DECAY, base=base, momentum=momentum,
                      exact_current=exact_current, orthogonal=True, residual=True)
    drawn = random_projection(derive_seed(0, 0, 0), shape[0], rank, dtype=torch.float64, orthogonal=True)  # (r, p)
    projector = torch.linalg.pinv(drawn) @ drawn  # (p, p)
    weight = _start(shape)
    second_moment = (_Adafactor if base == "adafactor" else _AdamW)(shape)
    ema = torch.zeros(shape, dtype=torch.float64)
    for t, grad in enumerate(_grads(shape)):
        matrix.grad = grad.clone()
        optimizer.step()
        step = t + 1
        correction = 1 - BETA1**step if base == "adamw" else 1.0
        inverse_root = second_moment.inverse_root(grad, step)  # (n, m)
        source = grad if momentum == "gradient" else grad * inverse_root  # (n, m)
        ema = BETA1 * ema + (1 - BETA1) * source  # (n, m), rows = the projected side
        complement = torch.eye(shape[0], dtype=torch.float64) - projector  # (p, p)
        direction = projector @ ema + correction * complement @ source  # (n, m)
        update = direction * inverse_root if momentum == "gradient" else direction
        weight = second_moment.apply(weight, update, step, correction)
        torch.testing.assert_close(matrix.detach(), weight, rtol=0, atol=1e-6)  # rows orthonormal to ~1e-7


def test_residual_needs_orthonormal_rows():
    with pytest.raises(ValueError) as info:
        Flora([torch.nn.Parameter(torch.zeros(4, 6))], lr=LR, rank=2, orthogonal=False, residual=True)
    assert "residual=True needs orthogonal=True" in str(info.value) and "\n" not in str(info.value)


def test_exact_current_keeps_the_first_step_exact():
    # one step from zero: the direction is (1 - beta1) * G exactly, whatever the rank
    shape = (6, 40)
    matrix = torch.nn.Parameter(_start(shape))
    optimizer = Flora([matrix], lr=LR, rank=2, base="adamw", exact_current=True, clip_threshold=1e9)
    grad = _grads(shape, steps=1)[0]
    matrix.grad = grad.clone()
    optimizer.step()
    denom = (grad * grad).sqrt() + EPS  # v_hat = G^2 after one bias-corrected step
    expected = _start(shape) - LR * grad / denom  # m_hat = G exactly
    torch.testing.assert_close(matrix.detach(), expected, rtol=0, atol=1e-12)


# --- state: the kind check and states saved before the options existed --------------------------------------------

def _saved(**options) -> dict:
    _, optimizer = _run_flora((6, 10), rank=3, **{**PAPER_ALG2, **options})
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _fresh(defaults: dict = PAPER_ALG2, **options) -> tuple[torch.nn.Parameter, Flora]:
    """A Flora with ``defaults`` (the paper's Alg. 2 unless given) overridden by ``options``."""
    matrix = torch.nn.Parameter(_start((6, 10)))
    return matrix, Flora([matrix], lr=LR, rank=3, kappa=KAPPA, weight_decay=WEIGHT_DECAY, **{**defaults, **options})


@pytest.mark.parametrize("saved_options, here_options, fragment", [
    (dict(momentum="update"), dict(), "momentum='update' but this one has momentum='gradient'"),
    (dict(), dict(momentum="update"), "momentum='gradient' but this one has momentum='update'"),
    (dict(exact_current=True), dict(), "exact_current=True saved vs False here"),
    (dict(orthogonal=True), dict(), "orthogonal=True saved vs False here"),
    (dict(orthogonal=True), dict(orthogonal=True, residual=True), "residual=False but this one has residual=True"),
    (dict(orthogonal=True, residual=True), dict(orthogonal=True), "residual=True but this one has residual=False"),
])
def test_a_state_saved_with_other_options_is_refused_in_one_line(saved_options, here_options, fragment):
    saved = _saved(**saved_options)
    _, optimizer = _fresh(**here_options)
    with pytest.raises(ValueError) as info:
        optimizer.load_state_dict(saved)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not optimizer.state


def _legacy(saved: dict) -> dict:
    """The state_dict layout of Flora before the options existed: no "momentum"/"exact_current"/"residual" keys."""
    groups = [{k: v for k, v in g.items() if k not in ("momentum", "exact_current", "residual")}
              for g in saved["param_groups"]]
    return {**saved, "param_groups": groups}


def test_a_state_saved_before_the_options_existed_loads_as_alg2_and_resumes_bitwise():
    steps = 7
    grads = _grads((6, 10), steps)
    uninterrupted, optimizer = _fresh()
    for grad in grads:
        uninterrupted.grad = grad.clone()
        optimizer.step()
    interrupted, optimizer = _fresh()
    for grad in grads[:2]:
        interrupted.grad = grad.clone()
        optimizer.step()
    legacy = _legacy(optimizer.state_dict())
    assert "momentum" not in legacy["param_groups"][0]
    resumed, optimizer = _fresh()
    resumed.data.copy_(interrupted.detach())
    optimizer.load_state_dict(legacy)
    group = optimizer.param_groups[0]
    assert group["momentum"] == "gradient" and group["exact_current"] is False and group["residual"] is False
    for grad in grads[2:]:  # crosses the kappa boundaries at steps 3 and 6
        resumed.grad = grad.clone()
        optimizer.step()
    assert torch.equal(resumed, uninterrupted)
    # an old state is a "gradient", Alg. 2 state: refused by the other settings, in one line naming the option
    for options, fragment in ((dict(momentum="update"), "momentum='gradient'"),
                              (dict(exact_current=True), "exact_current=False but this one has exact_current=True")):
        with pytest.raises(ValueError, match=fragment):
            _fresh(**options)[1].load_state_dict(legacy)
    # ... and by today's defaults (update, current exact, orthonormal), in one line, leaving the optimizer untouched
    _, default = _fresh(defaults={})
    with pytest.raises(ValueError) as info:
        default.load_state_dict(legacy)
    assert "orthogonal=False saved vs True here" in str(info.value)  # the first difference found names itself
    assert "\n" not in str(info.value) and not default.state


# --- arguments and presets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, fragment", [
    (dict(momentum="adam"), "momentum='adam'"),
    (dict(momentum=None), "momentum=None"),
    (dict(exact_current="yes"), "exact_current='yes'"),
    (dict(exact_current=1), "exact_current=1"),
])
def test_bad_option_values_raise_one_line_errors(options, fragment):
    with pytest.raises(ValueError) as info:
        Flora([torch.nn.Parameter(torch.zeros(4, 6))], lr=LR, rank=2, **options)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_presets_name_the_paper_and_the_authors_settings():
    param = torch.nn.Parameter(torch.zeros(4, 6))
    paper = Flora.paper_alg2([param], lr=LR, rank=2, kappa=5).param_groups[0]
    assert {k: paper[k] for k in PAPER_ALG2} == PAPER_ALG2 and paper["kappa"] == 5
    default = Flora([param], lr=LR, rank=2).param_groups[0]
    # the defaults are the best measured choice (issue #16); Alg. 2 is the preset above
    assert {k: default[k] for k in PAPER_ALG2} == BEST_MEASURED and default["eps1"] == 1e-15
    authors = Flora.authors_code([param], lr=LR, rank=2).param_groups[0]
    assert {k: authors[k] for k in AUTHORS_CODE} == AUTHORS_CODE
    assert authors["momentum"] == "update" and authors["exact_current"] is True and authors["base"] == "adafactor"
    with pytest.raises(ValueError) as info:
        Flora.authors_code([param], lr=LR, rank=2, momentum="gradient")
    assert "momentum='gradient'" in str(info.value) and "\n" not in str(info.value)
    Flora.paper_alg2([param], lr=LR, rank=2, orthogonal=False)  # restating the preset is fine


def test_method_options_pass_the_momentum_options_to_flora():
    from velora.methods.registry import MethodOptions, build_optimizer
    from velora.training.models import build_config, build_model

    model = build_model(build_config("llama-tiny", vocab_size=256))
    options = MethodOptions.from_flat(dict(lr=1e-2, optimizer="adafactor", flora_rank=4, flora_momentum="update",
                                           flora_exact_current=True, flora_momentum_orthogonal=True))
    group = build_optimizer(model, "flora", options).param_groups[0]
    assert (group["momentum"], group["exact_current"], group["orthogonal"]) == ("update", True, True)
    default = build_optimizer(model, "flora", MethodOptions.from_flat({"lr": 1e-2, "flora_rank": 4})).param_groups[0]
    assert {k: default[k] for k in PAPER_ALG2} == BEST_MEASURED and default["eps1"] == 1e-15  # velora train's too
    alg2 = MethodOptions.from_flat(dict(lr=1e-2, flora_rank=4, flora_momentum="gradient", flora_exact_current=False,
                                        flora_momentum_orthogonal=False))
    assert {k: build_optimizer(model, "flora", alg2).param_groups[0][k] for k in PAPER_ALG2} == PAPER_ALG2
    with pytest.raises(ValueError, match="flora_momentum='adam'"):
        MethodOptions.from_flat({"lr": 1e-2, "flora_momentum": "adam"})


# --- the uncompressed reference of benchmarks/bench_flora_momentum.py ---------------------------------------------

@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_rank_at_the_full_smaller_side_is_exactly_uncompressed_momentum(shape):
    # the bench's reference row: rank = the smaller side, no force_compress -> no projection, a full (n, m) momentum
    flora, optimizer = _run_flora(shape, rank=min(shape), momentum="update")
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert "seed" not in state and tuple(state["momentum"].shape) == shape
    expected = _reference(shape, "adafactor", "update", False)  # rank=None: EMA of G / sqrt(v_hat), written out
    torch.testing.assert_close(flora, expected, rtol=0, atol=1e-12)  # no projection: equal up to float64 rounding
    compressed = _reference(shape, "adafactor", "update", False, rank=min(shape) - 1)
    assert (flora - compressed).abs().max() > 1e-4  # one rank less is compressed and differs


def test_the_bench_reference_options_keep_every_llama_small_momentum_uncompressed():
    from velora.methods.registry import MethodOptions, build_optimizer
    from velora.training.models import build_config, build_model

    torch.manual_seed(0)
    model = build_model(build_config("llama-small", vocab_size=256))
    for param in model.parameters():
        param.grad = torch.randn_like(param)

    def compressed_matrices(rank: int) -> int:
        options = MethodOptions.from_flat(dict(lr=3e-2, optimizer="adafactor", flora_rank=rank, flora_kappa=1000,
                                               flora_momentum="update"))
        optimizer = build_optimizer(model, "flora", options)
        optimizer.step()
        return sum("seed" in state for state in optimizer.state.values())

    assert compressed_matrices(128) == 0  # the bench's reference: d_model = 128 is every matrix's smaller side
    assert compressed_matrices(64) == 28  # r = 64: all 7 attention/MLP matrices of each of the 4 layers


def test_authors_code_keeps_adafactors_estimate_for_gradients_below_float32_eps():
    # after clipping, small models have mean(G^2) < float32 eps (1.2e-7), where torch's eps1 rule clamps the row mean;
    # flora-opt floors v_hat at 1e-30 instead, and so must its preset (issue #16: 53.93 -> 47.67 val ppl uncompressed)
    start = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    grad = 1e-5 * torch.randn(6, 10, generator=torch.Generator().manual_seed(1))  # mean(G^2) ~ 1e-10
    matrix = torch.nn.Parameter(start.clone())
    optimizer = Flora.authors_code([matrix], lr=LR, rank=3, kappa=KAPPA)
    matrix.grad = grad.clone()
    optimizer.step()
    grad64 = grad.double()
    row, col = (grad64**2).mean(dim=1, keepdim=True), (grad64**2).mean(dim=0, keepdim=True)  # (6, 1), (1, 10)
    v_hat = row @ col / row.mean()  # (6, 10): Adafactor's estimate at step 1 (beta2_1 = 0), no clamp
    update = (1 - BETA1) * grad64 / v_hat.sqrt()  # the first step's exact current update; RMS ~0.1, no clip
    expected = start.double() - max(1e-3, start.double().pow(2).mean().sqrt().item()) * LR * update
    torch.testing.assert_close(matrix.detach().double(), expected, rtol=1e-5, atol=1e-7)
