"""Multi-process behaviour on CPU: 2 gloo ranks (spawned once per module) against 1-process references.

One spawn runs every scenario (spawning costs seconds; the scenarios take milliseconds) and saves what
each rank saw; the tests below compare those files with a single-process run on the concatenated
batch. Models are float64 so "equal" can mean 1e-10, not "close enough".
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_results import gloo_ranks
from torch import nn

from velora import VeLoRAConfig, apply_velora, velora_modules
from velora.integrations.distributed import (
    bucket_wire_bytes,
    compress_gradient,
    decompress_gradient,
    shard_indices,
)
from velora.optim.projections import compression_plan, derive_seed, random_projection

VOCAB, WIDTH, SEQ, PER_RANK, WORLD = 64, 32, 8, 2, 2
VELORA = VeLoRAConfig(sub_token_size=16, target_modules="paper")
COMM_RANK, COMM_SEED = 4, 11
# the direction options of VeLoRAConfig (issue #17): 3 steps, so reestimate_every=2 re-estimates at the third
DIRECTION_CONFIGS = {
    "per_group": VeLoRAConfig(sub_token_size=16, target_modules="paper", per_group_directions=True),
    "reestimate": VeLoRAConfig(sub_token_size=16, target_modules="paper", per_group_directions=True,
                               reestimate_every=2),
    "reestimate_svd": VeLoRAConfig(sub_token_size=16, target_modules="paper", init="svd", rank=2,
                                   reestimate_every=2),
    # per-group top-2 directions of every forward's batch (the fidelity study's per-group-svd-*-reest-1)
    "reestimate_svd_per_group_every_forward": VeLoRAConfig(sub_token_size=16, target_modules="paper", init="svd",
                                                           rank=2, per_group_directions=True, reestimate_every=1),
}


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.v_proj = nn.Linear(WIDTH, WIDTH)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(WIDTH, 2 * WIDTH)
        self.down_proj = nn.Linear(2 * WIDTH, WIDTH)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = _Attention(), _MLP()

    def forward(self, h):
        h = h + self.self_attn.v_proj(h)  # (B, T, W)
        return h + self.mlp.down_proj(F.gelu(self.mlp.up_proj(h)))  # (B, T, W)


class TinyLM(nn.Module):
    """LLaMA-like names (self_attn.v_proj, mlp.down_proj) without importing transformers (fast spawn)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.norm = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def get_output_embeddings(self):  # as transformers models expose their head
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)  # (B, T, W)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h))  # (B, T, V)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _model(velora: VeLoRAConfig | None = VELORA, dtype: torch.dtype = torch.float64) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    return apply_velora(model, velora) if velora is not None else model


def _batches(steps: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, WORLD * PER_RANK, SEQ), generator=generator)  # (S, B, T)


def _local(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[list(shard_indices(batch.shape[0], rank, WORLD))]  # (B/world, T)


# float32 Adam divides by sqrt(v): a near-zero gradient turns 1e-9 rounding noise (all-reduce vs one batch,
# thread count) into O(lr) update differences; a larger eps bounds that so the test checks DDP, not rounding
FP32_EPS = 1e-5


def _flora(model):
    from velora.optim.flora import Flora

    return Flora(model, lr=1e-2, rank=4, kappa=2, base="adamw", seed=3, eps=FP32_EPS)  # model: matrices only


def _galore(model):
    from velora.methods.registry import projected_linear_weights
    from velora.optim.galore import GaLoreAdamW

    projected, rest = projected_linear_weights(model)
    return GaLoreAdamW([{"params": rest}, {"params": projected, "rank": 4, "update_proj_gap": 2, "scale": 0.25}],
                       lr=1e-2, eps=FP32_EPS)


OPTIMIZERS = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2),
    "flora": _flora,
    "galore": _galore,
}
# Flora / GaLoreAdamW run on float32 models here (their float64 path is tested in test_optim_float64.py),
# so their comparisons are at float32 precision
DTYPES = {"adamw": torch.float64, "flora": torch.float32, "galore": torch.float32}
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def _velora_v(model) -> dict[str, torch.Tensor]:
    return {name: layer.velora_v.clone() for name, layer in velora_modules(model).items()}


def _train(model, optimizer, batches, rank=None, record_v=None):
    """Full steps; ``rank`` given: this rank's shard of each batch (DDP), else the whole batch."""
    for step, batch in enumerate(batches):
        ids = batch if rank is None else _local(batch, rank)
        model(ids).backward()
        if step == 0 and record_v is not None:
            record_v.update(_velora_v(model.module if hasattr(model, "module") else model))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def _ddp(model, **kwargs):
    from torch.nn.parallel import DistributedDataParallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers is deprecated in new torch
        return DistributedDataParallel(model, broadcast_buffers=False, **kwargs)


def _accumulate(model, optimizer, batches, micro_batches: int, rank=None, ddp=None, comm_hook=False):
    from velora.integrations.distributed import register_flora_comm_hook, sync_context
    from velora.optim.accumulate import CompressedGradAccumulator

    accumulator = CompressedGradAccumulator(model, rank=4, accumulation_steps=micro_batches, seed=5)
    hook_state = None
    if comm_hook:  # all-reduce the accumulator's (k × r) sums instead of the decompressed gradients
        hook_state = register_flora_comm_hook(ddp, rank=COMM_RANK, seed=COMM_SEED, accumulator=accumulator)
    for batch in batches:
        ids = batch if rank is None else _local(batch, rank)
        for micro, chunk in enumerate(ids.chunk(micro_batches)):
            with sync_context(ddp or model, last_micro_batch=micro == micro_batches - 1):  # no_sync but last
                (ddp or model)(chunk).backward()
        assert accumulator.cycle_complete
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    accumulator.remove()
    return hook_state


# ---- the spawned ranks ----------------------------------------------------------------------------------


def _ranks_worker(rank: int, world: int, out_dir: str) -> None:
    import time

    from velora.integrations.distributed import (
        broadcast_velora_state,
        main_process_first,
        mean_across_ranks,
        rank_batch_index,
        register_flora_comm_hook,
        velora_state_in_sync,
        wrap_ddp,
    )

    results: dict = {}
    with main_process_first():
        entered = time.monotonic()
        time.sleep(0.2 if rank == 0 else 0.0)
        left = time.monotonic()
    results["helpers"] = {"mean": mean_across_ranks(float(rank)), "index": rank_batch_index(3),
                          "first": torch.tensor([entered, left], dtype=torch.float64)}
    batches = _batches(3)
    for name, make_optimizer in OPTIMIZERS.items():
        model = _model(dtype=DTYPES[name])
        ddp = _ddp(model)
        v_first = {}
        optimizer = make_optimizer(model)
        _train(ddp, optimizer, batches, rank=rank, record_v=v_first)
        state = {f"{index}.{key}": value.clone() for index, entry in optimizer.state_dict()["state"].items()
                 for key, value in entry.items() if isinstance(value, torch.Tensor)}  # moments, seeds, steps
        results[name] = {"v_first": v_first, "params": {k: v.clone() for k, v in model.state_dict().items()},
                         "in_sync": velora_state_in_sync(model), "optimizer_state": state}

    # per-group directions and periodic re-estimation, synchronised as the first-batch init is
    for key, config in DIRECTION_CONFIGS.items():
        model = _model(config)
        v_first = {}
        _train(_ddp(model), torch.optim.AdamW(model.parameters(), lr=1e-2), batches, rank=rank, record_v=v_first)
        results[key] = {"v_first": v_first, "v_last": _velora_v(model), "in_sync": velora_state_in_sync(model),
                        "params": {k: v.clone() for k, v in model.state_dict().items()}}

    # FSDP2: every VeLoRA layer, every block and the root sharded over the 2 ranks (gloo on CPU)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for module in [*velora_modules(model).values(), *model.layers, model]:
        fully_shard(module, mesh=mesh)
    v_first = {}
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches, rank=rank, record_v=v_first)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}  # gathers the shards (a collective: every rank calls it)
    results["fsdp2"] = {"v_first": v_first, "params": full,
                        "wrapped": type(model.layers[0].mlp.down_proj).__name__}
    results["fsdp2_meta"] = _meta_fsdp2_run(mesh, batches, rank)

    # negative control: without the cross-rank init, each rank computes its own v
    unsynced = _model(VeLoRAConfig(sub_token_size=16, target_modules="paper", sync_across_ranks=False))
    ddp = _ddp(unsynced)
    ddp(_local(batches[0], rank)).backward()
    results["unsynced"] = {"v": _velora_v(unsynced), "in_sync_before": velora_state_in_sync(unsynced)}
    broadcast_velora_state(unsynced)
    results["unsynced"]["in_sync_after"] = velora_state_in_sync(unsynced)
    results["unsynced"]["v_after"] = _velora_v(unsynced)
    # re-estimate counters that differ (rank 1 ran one more forward) are aligned too: the next re-estimate then
    # falls on the same forward on every rank
    drifted = _model(VeLoRAConfig(sub_token_size=16, target_modules="paper", sync_across_ranks=False,
                                  reestimate_every=2))
    for _ in range(1 + rank):
        drifted(_local(batches[rank], rank)).backward()
    broadcast_velora_state(drifted)
    drifted(_local(batches[2], rank)).backward()  # forward 1 everywhere after the broadcast: not due
    results["drifted"] = {"v": _velora_v(drifted), "in_sync": velora_state_in_sync(drifted)}

    # FLoRA compressed accumulation under no_sync: 2 micro-batches per step, 2 steps (float64: AdamW's
    # normalisation would turn float32 summation-order differences into 1e-5 parameter differences)
    model = _model(dtype=torch.float64)
    ddp = wrap_ddp(model)
    _accumulate(model, torch.optim.AdamW(model.parameters(), lr=1e-2), _batches(2, seed=4), 2, rank=rank, ddp=ddp)
    results["accumulate"] = {k: v.clone() for k, v in model.state_dict().items()}
    model = _model(dtype=torch.float32)
    ddp = wrap_ddp(model)
    hook_state = _accumulate(model, torch.optim.AdamW(model.parameters(), lr=1e-2), _batches(2, seed=4), 2,
                             rank=rank, ddp=ddp, comm_hook=True)
    results["accumulate_hook"] = {"params": {k: v.clone() for k, v in model.state_dict().items()},
                                  "wire_bytes": hook_state.wire_bytes, "dense_bytes": hook_state.dense_bytes}

    # compressed all-reduce: two backwards (no optimizer step, so the parent can recompute local grads)
    model = _model(None)
    ddp = _ddp(model, bucket_cap_mb=0.01, gradient_as_bucket_view=True)  # several buckets, grads as views
    state = register_flora_comm_hook(ddp, rank=COMM_RANK, seed=COMM_SEED)
    grads = []
    for batch in _batches(2, seed=7):
        ddp(_local(batch, rank)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=False)  # keep the bucket views
    results["comm_hook"] = {"grads": grads, "wire_bytes": state.wire_bytes, "dense_bytes": state.dense_bytes,
                            "step": state.step}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return gloo_ranks(tmp_path_factory, __name__)


def _assert_close_dicts(actual: dict, expected: dict, rtol=1e-9, atol=1e-11):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


# ---- tests ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # starts the module's 2-rank spawn (conftest runs slow tests first)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_two_rank_ddp_equals_one_rank_on_concatenated_batch(ranks, optimizer):
    reference = _model(dtype=DTYPES[optimizer])
    v_first = {}
    _train(reference, OPTIMIZERS[optimizer](reference), _batches(3), record_v=v_first)
    tolerance = TOLERANCES[DTYPES[optimizer]]
    for rank_result in ranks:
        _assert_close_dicts(rank_result[optimizer]["params"], reference.state_dict(), **tolerance)
        _assert_close_dicts(rank_result[optimizer]["v_first"], v_first, **tolerance)
        assert rank_result[optimizer]["in_sync"]


def _pretrained() -> dict[str, torch.Tensor]:
    """A 'pretrained checkpoint': plain weights (no VeLoRA state) other than the seed-0 init."""
    torch.manual_seed(5)
    return TinyLM().to(torch.float64).state_dict()


def _meta_fsdp2_run(mesh, batches: torch.Tensor, rank: int) -> dict:
    """Built on the meta device, apply_velora, fully_shard, to_empty, the pretrained weights loaded through the
    distributed state-dict API (each rank passes the full dict, FSDP2 keeps its shard), then trained: v must come
    from the first batch, not from the uninitialised memory to_empty hands out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = apply_velora(TinyLM().to(torch.float64), VELORA)
    for module in [*velora_modules(model).values(), *model.layers, model]:
        fully_shard(module, mesh=mesh)
    model.to_empty(device="cpu")
    ready_after_to_empty = all(not layer.velora_ready for layer in velora_modules(model).values())
    set_model_state_dict(model, _pretrained(), options=StateDictOptions(full_state_dict=True, strict=False))
    v_first = {}
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches, rank=rank, record_v=v_first)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}
    return {"v_first": v_first, "params": full, "reset_by_to_empty": ready_after_to_empty}


def test_fsdp2_from_the_meta_device_loads_pretrained_weights_and_equals_one_rank(ranks):
    """Meta-device init under FSDP2 end to end (build on meta, apply_velora, fully_shard, to_empty, load a
    pretrained state dict, train) equals one process that built the model on the CPU and loaded the same weights."""
    torch.manual_seed(0)
    reference = TinyLM().to(torch.float64)
    reference.load_state_dict(_pretrained())
    apply_velora(reference, VELORA)
    v_first = {}
    _train(reference, OPTIMIZERS["adamw"](reference), _batches(3), record_v=v_first)
    for rank_result in ranks:
        assert rank_result["fsdp2_meta"]["reset_by_to_empty"]  # to_empty left no garbage v marked ready
        _assert_close_dicts(rank_result["fsdp2_meta"]["params"], reference.state_dict())
        _assert_close_dicts(rank_result["fsdp2_meta"]["v_first"], v_first)


def test_fsdp2_fully_sharded_velora_layers_equal_one_rank(ranks):
    reference = _model()
    v_first = {}
    _train(reference, OPTIMIZERS["adamw"](reference), _batches(3), record_v=v_first)
    for rank_result in ranks:
        assert rank_result["fsdp2"]["wrapped"].startswith("FSDP")  # fully_shard really wrapped the VeLoRA layer
        _assert_close_dicts(rank_result["fsdp2"]["params"], reference.state_dict())
        _assert_close_dicts(rank_result["fsdp2"]["v_first"], v_first)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_state_bitwise_identical_across_ranks(ranks, optimizer):
    # Flora: same seeds, so the same projections and compressed momenta on both ranks
    first, second = (r[optimizer]["optimizer_state"] for r in ranks)
    assert first.keys() == second.keys() and len(first) > 0
    if optimizer == "flora":
        assert any("seed" in key for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_v_identical_across_ranks_after_first_step_without_buffer_broadcast(ranks):
    for optimizer in OPTIMIZERS:
        first, second = (r[optimizer]["v_first"] for r in ranks)
        assert first.keys() == set(velora_modules(_model()))
        for name in first:
            assert torch.equal(first[name], second[name]), name  # bitwise, not just close


@pytest.mark.parametrize("key", list(DIRECTION_CONFIGS))
def test_direction_options_keep_v_identical_across_ranks(ranks, key):
    first, second = (r[key] for r in ranks)
    assert first["in_sync"] and second["in_sync"]
    for name in first["v_last"]:
        assert torch.equal(first["v_first"][name], second["v_first"][name]), name
        assert torch.equal(first["v_last"][name], second["v_last"][name]), name
        if key.startswith("reestimate"):  # the third forward re-estimated v on both ranks
            assert not torch.equal(first["v_last"][name], first["v_first"][name]), name
    config = DIRECTION_CONFIGS[key]
    reference = _model(config)
    _train(reference, OPTIMIZERS["adamw"](reference), _batches(3))
    assert reference.layers[0].self_attn.v_proj.velora_v.dim() == (3 if config.per_group_directions else 2)
    # the mean over ranks of (per-group) means is the whole batch's; an SVD of the ranks' summed Gram matrices is
    # the whole batch's SVD (fp64: the eigh and SVD routes agree far inside the tolerance)
    for rank_result in ranks:
        _assert_close_dicts(rank_result[key]["params"], reference.state_dict())


def test_unsynced_v_differs_and_broadcast_velora_state_repairs_it(ranks):
    # the control proves the DDP test above can fail: per-rank means give per-rank v
    first, second = (r["unsynced"] for r in ranks)
    assert any(not torch.allclose(first["v"][n], second["v"][n]) for n in first["v"])
    assert not first["in_sync_before"] and not second["in_sync_before"]
    assert first["in_sync_after"] and second["in_sync_after"]
    for name in first["v"]:
        assert torch.equal(second["v_after"][name], first["v"][name])  # rank 0's v everywhere


def test_broadcast_velora_state_aligns_the_re_estimate_counters(ranks):
    first, second = (r["drifted"] for r in ranks)
    assert first["in_sync"] and second["in_sync"]
    for name in first["v"]:
        assert torch.equal(first["v"][name], second["v"][name]), name


def test_compressed_accumulation_under_no_sync_equals_one_rank(ranks):
    reference = _model(dtype=torch.float64)
    _accumulate(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), _batches(2, seed=4), 2)
    for rank_result in ranks:
        _assert_close_dicts(rank_result["accumulate"], reference.state_dict(), **TOLERANCES[torch.float64])


def test_comm_hook_sends_accumulator_sums_and_equals_one_rank(ranks):
    # the hook all-reduces the accumulator's own (k × r) sums: same result as 1 rank, fewer bytes
    reference = _model(dtype=torch.float32)
    _accumulate(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), _batches(2, seed=4), 2)
    from velora.optim import CompressedGradAccumulator

    accumulator = CompressedGradAccumulator(reference, rank=4, accumulation_steps=2)
    matrices = [(p, plan) for p, plan in zip(accumulator.params, accumulator.plans) if plan is not None]
    accumulator.remove()
    dense = 4 * sum(p.numel() for p in reference.parameters())
    expected_wire = dense - 4 * sum(p.numel() - plan.kept_dim * plan.rank for p, plan in matrices)
    for rank_result in ranks:
        _assert_close_dicts(rank_result["accumulate_hook"]["params"], reference.state_dict(),
                            **TOLERANCES[torch.float32])
        assert rank_result["accumulate_hook"]["dense_bytes"] == 2 * dense  # 2 optimizer steps
        assert rank_result["accumulate_hook"]["wire_bytes"] == 2 * expected_wire


def _local_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(ids).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_comm_hook_equals_all_reduce_then_compress(ranks):
    from velora.optim import projectable_parameters

    model = _model(None)
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    matrices = {id(p) for p in projectable_parameters(model)}
    compressed_names = [n for n, p in model.named_parameters() if id(p) in matrices]
    assert len(compressed_names) == 6 and "embed.weight" not in compressed_names  # vocab-sized: sent whole
    for step, batch in enumerate(_batches(2, seed=7)):
        per_rank = [_local_grads(model, _local(batch, r)) for r in range(WORLD)]
        for name in shapes:
            mean = sum(g[name] for g in per_rank) / WORLD  # plain all-reduce (mean)
            plan = compression_plan(shapes[name], COMM_RANK) if name in compressed_names else None
            if plan is None:
                expected = mean
            else:
                seed = derive_seed(COMM_SEED, index[name], step)
                projection = random_projection(seed, plan.projected_dim, plan.rank, dtype=torch.float64)
                expected = decompress_gradient(compress_gradient(mean, projection, plan.transposed), projection,
                                               plan.transposed)
                assert not torch.allclose(expected, mean, atol=1e-6)  # compression really happened
            for rank_result in ranks:
                torch.testing.assert_close(rank_result["comm_hook"]["grads"][step][name], expected,
                                           rtol=1e-9, atol=1e-12)


def test_comm_hook_byte_counts(ranks):
    model = _model(None)
    dense, wire = bucket_wire_bytes(model, None), bucket_wire_bytes(model, COMM_RANK)
    assert dense == 8 * sum(p.numel() for p in model.parameters())  # float64
    for rank_result in ranks:
        assert rank_result["comm_hook"]["step"] == 2
        assert rank_result["comm_hook"]["dense_bytes"] == 2 * dense
        assert rank_result["comm_hook"]["wire_bytes"] == 2 * wire
    assert wire < dense / 2  # embeddings / head dominate this toy; see benchmarks/bench_comm.py for LLaMA


def test_comm_hook_decompression_is_unbiased():
    # E[AᵀA] = I: averaging the round trip over many seeds converges to the gradient
    grad = torch.randn(6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plan = compression_plan(grad.shape, 2)
    total = torch.zeros_like(grad)
    trials = 600
    for seed in range(trials):
        projection = random_projection(seed, plan.projected_dim, plan.rank, dtype=torch.float64)
        total += decompress_gradient(compress_gradient(grad, projection, plan.transposed), projection, plan.transposed)
    error = (total / trials - grad).norm() / grad.norm()
    assert error < 0.25, error  # one draw alone is off by ~sqrt(projected side / rank) = sqrt(6 / 2)


def test_comm_hook_side_sets_the_bytes_sent():
    from velora.optim import projectable_parameters
    from velora.training.models import build_config, build_model

    with torch.device("meta"):
        model = build_model(build_config("llama-tiny", vocab_size=256))
    dense = bucket_wire_bytes(model, None)
    matrices = projectable_parameters(model)
    assert {tuple(p.shape) for p in matrices} == {(64, 64), (192, 64), (64, 192)}
    # every matrix is compressed at r = 8; it sends (kept side) x 8 numbers instead of rows x cols
    for side, kept in (("smaller", max), ("larger", min)):
        expected = dense - 4 * sum(p.numel() - kept(p.shape) * 8 for p in matrices)
        assert bucket_wire_bytes(model, 8, project=side) == expected
    assert bucket_wire_bytes(model, 8) == bucket_wire_bytes(model, 8, project="smaller")  # the default
    with pytest.raises(ValueError, match="project='up'"):
        bucket_wire_bytes(model, 8, project="up")


def test_rank_helpers(ranks):
    first, second = (r["helpers"] for r in ranks)
    assert first["mean"] == second["mean"] == 0.5
    assert (first["index"], second["index"]) == (6, 7)  # rank r takes batch 2*i + r
    assert second["first"][0] >= first["first"][1]  # rank 1 entered only after rank 0 left


def test_shard_indices_equal_sizes_and_errors():
    assert list(shard_indices(5, 0, 2)) == [0, 2] and list(shard_indices(5, 1, 2)) == [1, 3]
    with pytest.raises(ValueError, match="shard=2"):
        shard_indices(4, 2, 2)
    with pytest.raises(ValueError, match="cannot be split"):
        shard_indices(1, 0, 2)


def test_init_from_env_without_torchrun_is_a_no_op_and_bad_backends_fail(monkeypatch):
    from velora.integrations.distributed import init_from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == torch.device("cpu") and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="backend='mpi'"):
        init_from_env(backend="mpi")
    with pytest.raises(ValueError, match="needs CUDA"):
        init_from_env(backend="nccl")
    assert not dist.is_initialized()


def test_register_flora_comm_hook_rejects_plain_module():
    from velora.integrations.distributed import register_flora_comm_hook

    with pytest.raises(ValueError, match="DistributedDataParallel"):
        register_flora_comm_hook(_model(None), rank=4)


@pytest.mark.slow
def test_velora_train_runs_under_torchrun(torchrun_train):
    """`torchrun --nproc_per_node 2 -m velora train`: gloo on CPU, rank 0 alone writes and reports, the
    token count covers both ranks. (A stopped-and-resumed torchrun run ending bitwise where the
    uninterrupted one does was checked by hand; see docs/integrations.md. Three launches are too slow here.)
    The launch is conftest's ``torchrun_train``, shared with the progress-bar test."""
    import json

    out, done = torchrun_train
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    # one JSON line (above): rank 0 reports, rank 1 stays quiet
    assert result["status"] == "completed" and result["tokens"] == 4 * 2 * 2 * 32 * 2  # both ranks' tokens
    assert result["final_loss"] < result["initial_loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000004"]


def _nccl_cpu_collective_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    from velora.integrations.distributed import init_from_env, mean_across_ranks, shutdown

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_from_env(backend="nccl")
    value = mean_across_ranks(float(rank))  # a CPU tensor: what the loop logs every step
    torch.save({"mean": value}, f"{out}/rank{rank}.pt")
    shutdown()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 GPUs")
def test_an_nccl_group_also_runs_the_cpu_tensor_collectives(tmp_path):
    """With NCCL alone, the loop's logged-loss all-reduce (a CPU tensor) fails; gloo serves CPU tensors beside it."""
    import torch.multiprocessing as mp

    from velora.integrations.launch import free_port

    mp.spawn(_nccl_cpu_collective_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"rank{r}.pt")["mean"] for r in range(2)] == [0.5, 0.5]
