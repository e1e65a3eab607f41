"""Flora momentum, CompressedGradAccumulator, GaLoreAdamW and GradNormLoRP's optimizer under FSDP2 (``fully_shard``)
on CPU, 2 gloo ranks spawned once for the module: 2 ranks x half the batch must equal one process on the whole batch
(float64, every parameter, 6 steps), with each rank projecting only its own rows (the seeded methods gather no
gradient; the SVD methods gather it once per refresh)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rank_results import gloo_ranks
from torch import nn

WORLD, STEPS, BATCH = 2, 6, 8
FLORA_WIDTHS = [8, 12, 6, 5]  # weights (12, 8): columns anyway; (6, 12), (5, 6): sides switched; 5 rows: uneven
TALL_WIDTHS = [4, 8, 10]  # weights (8, 4), (10, 8): "smaller" projects the columns, no switch
WIDE_WIDTHS = [10, 8, 5]  # weights (8, 10), (5, 8): "smaller" would project the sharded rows, switched to columns
FLORA_OPTIONS = dict(lr=1e-2, rank=3, kappa=2, beta1=0.9, seed=5)  # kappa=2: the projection is resampled twice
# weights (12, 8): "std" projects the right side (rows stay sharded); (6, 12), (5, 6): the left side, whose (r, m)
# projection is all-reduced; update_proj_gap=3: a refresh at steps 0 and 3 with the moments carried over
GALORE_OPTIONS = dict(rank=3, update_proj_gap=3, reproject_moments=True)


class _Net(nn.Module):
    def __init__(self, widths: list[int]):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(a, b).double() for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == 0 else layer(torch.tanh(x))  # (B, width)
        return x.square().mean()


def _batch(widths: list[int], step: int) -> torch.Tensor:
    return torch.randn(BATCH, widths[0], dtype=torch.float64, generator=torch.Generator().manual_seed(step))


def _rank_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    size = batch.shape[0] // world
    return batch[rank * size:(rank + 1) * size]  # (B / world, D)


def _column_side(param: torch.Tensor) -> str:
    """The projection rule that projects the columns of ``param`` in one process (what FSDP2 switches to)."""
    return "smaller" if param.dim() < 2 or param.shape[0] >= param.shape[1] else "larger"


# --- the two runs ------------------------------------------------------------------------------------

def _flora(model: nn.Module, base: str, project_by_param: bool = False):
    from velora.optim import Flora

    if project_by_param:  # one process: a group per parameter, projecting the side FSDP2 projects
        params = [dict(params=[p], project=_column_side(p)) for p in model.parameters()]
    else:
        params = list(model.parameters())
    return Flora(params, base=base, **FLORA_OPTIONS)


def _flora_steps(model: nn.Module, optimizer, steps: range, rank: int, world: int) -> None:
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        model(_rank_rows(_batch(FLORA_WIDTHS, step), rank, world)).backward()
        optimizer.step()


def _flora_run(model: nn.Module, base: str, rank: int, world: int, project_by_param: bool):
    optimizer = _flora(model, base, project_by_param)
    _flora_steps(model, optimizer, range(STEPS), rank, world)
    return optimizer


def _accumulate(model: nn.Module, accumulator, optimizer, micros: range, widths: list[int], rank: int,
                world: int) -> None:
    """Micro-batches ``micros`` of a run of 2 micro-batches per step (each: this rank's half of it)."""
    for micro in micros:
        step, index = divmod(micro, 2)
        if index == 0:
            optimizer.zero_grad(set_to_none=True)
        model(_rank_rows(_batch(widths, 10 * step + index), rank, world)).backward()
        if index == 1:
            assert accumulator.cycle_complete
            optimizer.step()


def _accumulator(model: nn.Module, project: str):
    from velora.optim import CompressedGradAccumulator

    return CompressedGradAccumulator(list(model.parameters()), rank=3, accumulation_steps=2, seed=7, project=project)


def _accumulator_run(model: nn.Module, widths: list[int], project: str, rank: int, world: int) -> None:
    accumulator = _accumulator(model, project)
    _accumulate(model, accumulator, torch.optim.SGD(model.parameters(), lr=0.1), range(2 * STEPS), widths, rank,
                world)
    accumulator.remove()


def _accumulator_dcp(mesh, rank: int, world: int, checkpoint: str) -> dict:
    """Save the model and the accumulator through DCP in the middle of a cycle (after the first micro-batch of step
    3: open sums and partial bias gradients) and go on; a fresh model and accumulator load it and finish."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    middle = STEPS + 1  # micro-batches before the save
    model = _sharded(WIDE_WIDTHS, mesh)
    accumulator = _accumulator(model, "smaller")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # stateless
    _accumulate(model, accumulator, optimizer, range(middle), WIDE_WIDTHS, rank, world)
    dcp.save({"model": get_model_state_dict(model), "acc": accumulator.state_dict()}, checkpoint_id=checkpoint)
    _accumulate(model, accumulator, optimizer, range(middle, 2 * STEPS), WIDE_WIDTHS, rank, world)
    resumed_model = _sharded(WIDE_WIDTHS, mesh)
    resumed = _accumulator(resumed_model, "smaller")
    loaded = {"model": get_model_state_dict(resumed_model), "acc": resumed.state_dict()}
    dcp.load(loaded, checkpoint_id=checkpoint)
    set_model_state_dict(resumed_model, loaded["model"])
    resumed.load_state_dict(loaded["acc"])
    _accumulate(resumed_model, resumed, torch.optim.SGD(resumed_model.parameters(), lr=0.1), range(middle, 2 * STEPS),
                WIDE_WIDTHS, rank, world)
    return {"uninterrupted": _full(model), "resumed": _full(resumed_model), "middle": middle}


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def _galore(model: nn.Module):
    from velora.optim import GaLoreAdamW

    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return GaLoreAdamW([dict(params=matrices, **GALORE_OPTIONS), dict(params=others)], lr=1e-2, weight_decay=0.1)


def _gradnorm_net(widths: list[int]) -> nn.Module:
    """``_Net`` with every layer reparameterised by GradNormLoRP (rank 4): I (out, 4) projects its right side, J
    (4, in), whose 4 rows FSDP2 splits 2 + 2, its left side."""
    import velora

    model = _Net(widths)
    torch.manual_seed(1)  # J's init
    velora.apply_gradnorm_lorp(model, velora.GradNormLoRPConfig(rank=4, alpha=4, target_modules=r"layers\.\d"))
    return model


def _gradnorm(model: nn.Module):
    from velora.optim import gradnorm_lorp_optimizer

    return gradnorm_lorp_optimizer(model, lr=1e-2, proj_rank=2, update_proj_gap=3, reproject_moments=True)


def _svd_run(model: nn.Module, make_optimizer, rank: int, world: int):
    optimizer = make_optimizer(model)
    _flora_steps(model, optimizer, range(STEPS), rank, world)
    return optimizer


def _projectors(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    return {name: optimizer.state[p]["projector"] for name, p in model.named_parameters() if p in optimizer.state
            and "projector" in optimizer.state[p]}


def _sharded(widths: list[int], mesh, build=_Net) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build(widths)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _refusal(mesh) -> str:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from velora.optim import Flora

    model = _Net(FLORA_WIDTHS)
    fully_shard(model, mesh=mesh, shard_placement_fn=lambda param: Shard(1) if param.dim() == 2 else Shard(0))
    try:
        Flora(model.parameters(), lr=1e-2, rank=2)
    except ValueError as err:
        return str(err)
    return "accepted"


def _svd_of_a_nan_gradient(mesh) -> str:
    """A refresh on a gradient with a NaN in process rank 1's rows: rank 0 finds it in the gathered matrix."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from velora.optim.sharded_svd import sharded_svd_projector

    whole = torch.arange(48.0).view(8, 6)
    whole[7, 0] = float("nan")
    try:
        sharded_svd_projector(distribute_tensor(whole, mesh, [Shard(0)]), 2, "right")
    except ValueError as err:
        return str(err)
    return "accepted"


def _dcp_round_trip(mesh, rank: int, world: int, checkpoint: str, make_optimizer) -> dict:
    """Save through DCP after half the steps and go on (uninterrupted); a fresh model and optimizer load it and
    do the second half (resumed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    half = STEPS // 2
    model = _sharded(FLORA_WIDTHS, mesh)
    optimizer = make_optimizer(model)
    _flora_steps(model, optimizer, range(half), rank, world)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=checkpoint)
    saved_whole = _whole_state(model, optimizer)  # what was saved, gathered: a 2 -> 1 load must give it bitwise
    _flora_steps(model, optimizer, range(half, STEPS), rank, world)
    resumed_model = _sharded(FLORA_WIDTHS, mesh)
    resumed = make_optimizer(resumed_model)
    model_state, optimizer_state = get_state_dict(resumed_model, resumed)
    loaded = {"model": model_state, "optim": optimizer_state}
    dcp.load(loaded, checkpoint_id=checkpoint)
    set_state_dict(resumed_model, resumed, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    _flora_steps(resumed_model, resumed, range(half, STEPS), rank, world)
    return {"uninterrupted": _full(model), "resumed": _full(resumed_model), "saved_whole": saved_whole}


def _whole_state(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor as whole (unsharded) tensors, by FQN (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    whole = {f"model.{k}": v for k, v in model_state.items()}
    for fqn, entry in optimizer_state["state"].items():
        whole.update({f"optim.{fqn}.{k}": v for k, v in entry.items() if isinstance(v, torch.Tensor)})
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in whole.items()}


def _eight_bit_refusals(mesh) -> dict[str, str]:
    """What building each 8-bit optimizer over FSDP2 parameters says (before: accepted, and refused only by the
    first state_dict, i.e. at the first checkpoint)."""
    from velora.optim import Flora, GaLoreAdamW

    model = _sharded(FLORA_WIDTHS, mesh)
    refusals = {}
    for name, build in (("Flora", lambda: Flora(model.parameters(), eight_bit=True, **FLORA_OPTIONS)),
                        ("GaLoreAdamW", lambda: GaLoreAdamW(model.parameters(), eight_bit=True))):
        try:
            build()
            refusals[name] = "accepted"
        except ValueError as err:
            refusals[name] = str(err)
    return refusals


def _train_config(method: str, accumulation_steps: int, batch_size: int = 2, velora=None, **options):
    from velora.training.config import TrainConfig

    extra = {} if velora is None else {"velora": velora}
    return TrainConfig(method=method, model="llama-tiny", tokenizer="byte", max_train_chars=100_000, steps=4,
                       batch_size=batch_size, seq_len=32, accumulation_steps=accumulation_steps, lr=3e-3,
                       warmup_steps=1, eval_batches=1, options=options, **extra)


# the loop under --parallel fsdp2: GaLore (refresh every 2 steps) with VeLoRA, FLoRA momentum + compressed accumulation
LOOP_RUNS = {"galore": ("galore+velora", 1, dict(galore_rank=4, update_proj_gap=2)),
             "flora": ("flora+velora", 2, dict(flora_rank=4, flora_kappa=2, flora_accumulation=True)),
             # 8-bit coefficients, one scale per token: which rank holds a token cannot change its rounding (a seeded
             # random basis, so the directions do not depend on how the first batch is split)
             "velora_int8": ("velora", 1, dict(velora={"sub_token_size": 16, "rank": 16, "coefficient_bits": 8,
                                                       "coefficient_scales": "token", "init": "random",
                                                       "target_modules": "paper"})),
             # 4-bit coefficients with per-column scales (the default): each rank scales the columns of its own
             # micro-batch, so it is not one process's rounding; resumed only
             "velora_int4_columns": ("velora", 1, dict(velora={"sub_token_size": 16, "rank": 16, "coefficient_bits": 4,
                                                               "init": "random", "target_modules": "paper"}))}
# stopped at step 2 and resumed through DCP (a train() call costs ~1 s per rank): FLoRA, whose state is the richest
# (momentum, seeds, kappa crossing, open accumulation sums); GaLore's state resumes bitwise in the optimizer test;
# and the quantised coefficients (nothing of theirs is state: the resumed run must round exactly as the whole one)
LOOP_RESUMED = ("flora", "velora_int8", "velora_int4_columns")


def _train(config, out: str, **kwargs) -> dict:
    from velora.training.loop import train

    return train(config, out, progress=False, measure=False, tensorboard=False, memory_check=False,
                 cache_dir=Path(out).parent / "cache", **kwargs)


def _loop_runs(out_dir: str) -> dict:
    """``train(parallel="fsdp2")`` in this rank's process: 4 steps uninterrupted, and 2 steps then a resume to 4."""
    results = {}
    for name, (method, accumulation_steps, options) in LOOP_RUNS.items():
        config = _train_config(method, accumulation_steps, **options)
        whole = _train(config, f"{out_dir}/{name}-whole", parallel="fsdp2")
        results[name] = {"whole": _full(whole["_model"]), "losses": [loss for _, loss in whole["loss_curve"]]}
        if name not in LOOP_RESUMED:
            continue
        _train(config, f"{out_dir}/{name}-resumed", parallel="fsdp2", stop_at_step=2)
        resumed = _train(config, f"{out_dir}/{name}-resumed", parallel="fsdp2", resume=True)
        results[name].update({"resumed": _full(resumed["_model"]),
                              "resumed_losses": [loss for _, loss in resumed["loss_curve"]]})
    try:
        _train(_train_config("lora", 1), f"{out_dir}/lora", parallel="fsdp2")
    except ValueError as err:
        results["refusal"] = str(err)
    return results


def _worker(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # as the tests' own process (conftest): 2 ranks share the cores

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for base in ("adafactor", "adamw"):
        model = _sharded(FLORA_WIDTHS, mesh)
        optimizer = _flora_run(model, base, rank, world, project_by_param=False)
        results[f"flora_{base}"] = _full(model)
        results[f"flora_{base}_state"] = {name: {key: tuple(value.shape) for key, value in optimizer.state[p].items()}
                                          for name, p in model.named_parameters()}
    for name, widths in (("tall", TALL_WIDTHS), ("wide", WIDE_WIDTHS)):
        model = _sharded(widths, mesh)
        _accumulator_run(model, widths, "smaller", rank, world)
        results[f"accumulate_{name}"] = _full(model)
    for name, build, make_optimizer in (("galore", _Net, _galore), ("gradnorm", _gradnorm_net, _gradnorm)):
        model = _sharded(FLORA_WIDTHS, mesh, build)
        optimizer = _svd_run(model, make_optimizer, rank, world)
        results[name] = _full(model)
        results[f"{name}_projectors"] = _projectors(model, optimizer)
    results["refusal"] = _refusal(mesh)
    results["svd_nan"] = _svd_of_a_nan_gradient(mesh)
    results["eight_bit"] = _eight_bit_refusals(mesh)
    results["dcp"] = _dcp_round_trip(mesh, rank, world, f"{out_dir}/checkpoint", lambda m: _flora(m, "adafactor"))
    results["checkpoint"] = f"{out_dir}/checkpoint"
    results["galore_dcp"] = _dcp_round_trip(mesh, rank, world, f"{out_dir}/galore_checkpoint", _galore)
    results["galore_checkpoint"] = f"{out_dir}/galore_checkpoint"
    results["accumulate_dcp"] = _accumulator_dcp(mesh, rank, world, f"{out_dir}/accumulate_checkpoint")
    results["accumulate_checkpoint"] = f"{out_dir}/accumulate_checkpoint"
    results["loop"] = _loop_runs(out_dir)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return gloo_ranks(tmp_path_factory, __name__)


def _assert_equal_to(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, reference in expected.items():
        torch.testing.assert_close(got[name], reference, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow  # starts the module's 2-rank spawn (conftest runs slow tests first)
@pytest.mark.parametrize("base", ["adafactor", "adamw"])
def test_flora_under_fsdp2_equals_one_process_on_the_whole_batch(ranks, base):
    model = _Net(FLORA_WIDTHS)
    _flora_run(model, base, 0, 1, project_by_param=True)
    expected = _full(model)
    initial = _full(_Net(FLORA_WIDTHS))
    assert all(not torch.equal(expected[n], initial[n]) for n in expected)  # every parameter moved
    for result in ranks:
        _assert_equal_to(result[f"flora_{base}"], expected)


def test_flora_state_under_fsdp2_is_sharded_and_records_the_projected_side(ranks):
    rank_rows = {0: [6, 3, 3], 1: [6, 3, 2]}  # rows 12, 6, 5 split by FSDP2 (5 -> 3 + 2)
    for rank, result in enumerate(ranks):
        state = result["flora_adafactor_state"]
        for index, rows in enumerate(rank_rows[rank]):
            weight = state[f"layers.{index}.weight"]
            assert weight["momentum"] == (rows, FLORA_OPTIONS["rank"])  # this rank's rows x rank: nothing gathered
            assert weight["projected_axis"] == ()  # a scalar: the columns were projected


@pytest.mark.parametrize("layout", ["tall", "wide"])
def test_compressed_accumulation_under_fsdp2_equals_one_process_on_the_whole_batch(ranks, layout):
    widths = TALL_WIDTHS if layout == "tall" else WIDE_WIDTHS
    model = _Net(widths)
    # one process projects the same side as FSDP2 (the columns): "smaller" for tall matrices, "larger" for wide
    _accumulator_run(model, widths, "smaller" if layout == "tall" else "larger", 0, 1)
    expected = _full(model)
    for result in ranks:
        _assert_equal_to(result[f"accumulate_{layout}"], expected)


def test_a_sharding_other_than_dim_0_is_refused_in_one_line(ranks):
    for result in ranks:
        message = result["refusal"]
        assert "FSDP2" in message and "Shard(dim=1)" in message and "DDP" in message and "\n" not in message, message


def test_an_eight_bit_state_under_fsdp2_is_refused_in_one_line_when_the_optimizer_is_built(ranks):
    for result in ranks:
        for name, message in result["eight_bit"].items():
            assert message.startswith(name) and "FSDP2" in message and "eight_bit=False" in message, message
            assert "\n" not in message, message


def _assert_resumed_bitwise(ranks, scenario: str) -> None:
    """On every rank: the run resumed from DCP ends bitwise where the uninterrupted one did."""
    for result in ranks:
        uninterrupted, resumed = result[scenario]["uninterrupted"], result[scenario]["resumed"]
        assert uninterrupted.keys() == resumed.keys()
        for name, expected in uninterrupted.items():
            assert torch.equal(resumed[name], expected), name


def _assert_loaded_bitwise(model: nn.Module, optimizer, expected: dict[str, torch.Tensor]) -> None:
    """The resharded (2 -> 1) load is lossless: every model and optimizer tensor is bitwise what the 2 ranks held
    when they saved (the 1-process continuation then differs from the 2-rank one only by the reduction order)."""
    loaded = _whole_state(model, optimizer)
    assert loaded.keys() == expected.keys() and len(expected) > len(_full(model))
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def _whole_checkpoint(checkpoint: str, tmp_path) -> dict:
    """A DCP checkpoint as one process reads it: DCP's own converter to whole tensors (a 2 -> 1 reshard)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = tmp_path / "whole.pt"
    dcp_to_torch_save(checkpoint, whole)
    return torch.load(whole, weights_only=False)


def test_flora_state_saved_through_dcp_at_2_ranks_continues_bitwise(ranks):
    _assert_resumed_bitwise(ranks, "dcp")


def test_a_state_recording_the_projected_columns_keeps_them_in_one_process():
    """What a single process does with an FSDP2 state whose wide matrix had its sides switched: it goes on projecting
    the columns (``projected_axis``) although its group says project="smaller" (which would pick the rows)."""
    from velora.optim import Flora

    def run(model: nn.Module, optimizer, steps: range) -> None:
        for step in steps:
            optimizer.zero_grad(set_to_none=True)
            model(_batch(WIDE_WIDTHS, step)).backward()
            optimizer.step()

    columns = _Net(WIDE_WIDTHS)  # weights (8, 10), (5, 8): "larger" projects their columns
    columns_optimizer = Flora(columns.parameters(), base="adamw", project="larger", **FLORA_OPTIONS)
    run(columns, columns_optimizer, range(3))
    saved = columns_optimizer.state_dict()
    weights = [index for index, p in enumerate(columns.parameters()) if p.dim() == 2]
    for index in weights:  # what an FSDP2 run saves for a matrix whose rows it could not project
        saved["state"][index]["projected_axis"] = torch.tensor(1, dtype=torch.int64)
    saved["param_groups"][0]["project"] = "smaller"
    resumed = _Net(WIDE_WIDTHS)
    resumed.load_state_dict(columns.state_dict())
    resumed_optimizer = Flora(resumed.parameters(), base="adamw", project="smaller", **FLORA_OPTIONS)
    resumed_optimizer.load_state_dict(saved)
    run(columns, columns_optimizer, range(3, STEPS))
    run(resumed, resumed_optimizer, range(3, STEPS))
    for (name, expected), got in zip(columns.named_parameters(), resumed.parameters()):
        assert torch.equal(got, expected), name


def test_flora_state_saved_through_dcp_at_2_ranks_loads_in_one_process(ranks, tmp_path):
    """Reshard 2 -> 1: DCP's own converter gives the whole tensors; one process (same options, project="smaller")
    loads them, keeps projecting the columns the shards projected, and ends where the 2 ranks did."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    saved = _whole_checkpoint(ranks[0]["checkpoint"], tmp_path)
    model = _Net(FLORA_WIDTHS)
    optimizer = _flora(model, "adafactor")
    set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    wide_weight = model.layers[1].weight  # (6, 12): "smaller" would project its rows
    assert optimizer.state[wide_weight]["momentum"].shape == (6, FLORA_OPTIONS["rank"])
    _assert_loaded_bitwise(model, optimizer, ranks[0]["dcp"]["saved_whole"])
    _flora_steps(model, optimizer, range(STEPS // 2, STEPS), 0, 1)
    _assert_equal_to(_full(model), ranks[0]["dcp"]["uninterrupted"])


@pytest.mark.parametrize("method", ["galore", "gradnorm"])
def test_svd_projected_optimizers_under_fsdp2_equal_one_process_on_the_whole_batch(ranks, method):
    build, make_optimizer = (_Net, _galore) if method == "galore" else (_gradnorm_net, _gradnorm)
    model = build(FLORA_WIDTHS)
    optimizer = _svd_run(model, make_optimizer, 0, 1)
    expected, initial = _full(model), _full(build(FLORA_WIDTHS))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(not torch.equal(expected[n], initial[n]) for n in trained)  # every trained parameter moved
    expected_projectors = _projectors(model, optimizer)
    assert expected_projectors.keys() == ranks[0][f"{method}_projectors"].keys() and expected_projectors
    for result in ranks:
        _assert_equal_to(result[method], expected)
        _assert_equal_to(result[f"{method}_projectors"], expected_projectors)
    for name, projector in ranks[0][f"{method}_projectors"].items():  # computed once on rank 0, broadcast
        assert torch.equal(ranks[1][f"{method}_projectors"][name], projector), name


def test_galore_state_saved_through_dcp_at_2_ranks_continues_bitwise_and_loads_in_one_process(ranks, tmp_path):
    from torch.distributed.checkpoint.state_dict import set_state_dict

    _assert_resumed_bitwise(ranks, "galore_dcp")
    saved = _whole_checkpoint(ranks[0]["galore_checkpoint"], tmp_path)
    model = _Net(FLORA_WIDTHS)
    optimizer = _galore(model)
    set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optim"])
    assert optimizer.state[model.layers[0].weight]["exp_avg"].shape == (12, GALORE_OPTIONS["rank"])  # right: rows
    assert optimizer.state[model.layers[1].weight]["exp_avg"].shape == (GALORE_OPTIONS["rank"], 12)  # left
    _assert_loaded_bitwise(model, optimizer, ranks[0]["galore_dcp"]["saved_whole"])
    _flora_steps(model, optimizer, range(STEPS // 2, STEPS), 0, 1)
    _assert_equal_to(_full(model), ranks[0]["galore_dcp"]["uninterrupted"])


def test_accumulator_state_saved_through_dcp_mid_cycle_continues_bitwise_at_2_ranks_and_in_one_process(ranks,
                                                                                                    tmp_path):

    _assert_resumed_bitwise(ranks, "accumulate_dcp")
    saved = _whole_checkpoint(ranks[0]["accumulate_checkpoint"], tmp_path)
    model = _Net(WIDE_WIDTHS)
    model.load_state_dict(saved["model"])
    accumulator = _accumulator(model, "smaller")  # the same options: "smaller" would project the (8, 10) rows
    assert accumulator.buffers[0].shape == (10, 3)
    accumulator.load_state_dict(saved["acc"])  # the state records that the shards projected the columns
    assert accumulator.buffers[0].shape == (8, 3) and accumulator.buffers[0].abs().sum() > 0  # the open sum
    assert model.layers[0].bias.grad is not None  # the partial gradient of an uncompressed parameter
    middle = ranks[0]["accumulate_dcp"]["middle"]
    _accumulate(model, accumulator, torch.optim.SGD(model.parameters(), lr=0.1), range(middle, 2 * STEPS),
                WIDE_WIDTHS, 0, 1)
    _assert_equal_to(_full(model), ranks[0]["accumulate_dcp"]["uninterrupted"])


@pytest.mark.parametrize("name", LOOP_RESUMED)
def test_the_training_loop_under_fsdp2_resumes_bitwise(ranks, name):
    for result in ranks:
        runs = result["loop"][name]
        assert runs["resumed_losses"][-2:] == runs["losses"][2:]  # the resumed invocation's own steps 3 and 4
        assert runs["whole"].keys() == runs["resumed"].keys()
        for key, expected in runs["whole"].items():
            assert torch.equal(runs["resumed"][key], expected), key


@pytest.mark.parametrize("name", ["galore", "velora_int8"])
def test_the_training_loop_under_fsdp2_equals_one_process_on_the_whole_batch(ranks, tmp_path, name):
    """2 ranks x 2 sequences (FSDP2) against one process on the 4 (float32): rank r's batch 2s + r is half of the one
    process's batch s, so the loss, the VeLoRA v (a mean over the ranks' first batches) and every update agree. With
    8-bit coefficients a token's rounding is its own, but a coefficient within float32 noise of a rounding boundary
    may round the other way once the weights differ in the last bits: there the weights agree to 1e-4 (3% of one
    step's lr; measured 2.1e-5 in 218 of 12288 entries of one layer)."""
    method, _, options = LOOP_RUNS[name]
    atol = 1e-4 if name == "velora_int8" else 1e-6
    single = _train(_train_config(method, 1, batch_size=4, **options), str(tmp_path / "single"))
    expected = _full(single["_model"])
    for result in ranks:
        runs = result["loop"][name]
        torch.testing.assert_close(runs["losses"], [loss for _, loss in single["loss_curve"]], rtol=1e-5, atol=0)
        assert runs["whole"].keys() == expected.keys()
        for key, reference in expected.items():  # float32: the gradient's reduction order differs
            torch.testing.assert_close(runs["whole"][key], reference, rtol=1e-5, atol=atol, msg=key)


def test_the_training_loop_refuses_a_method_fsdp2_does_not_run_in_one_line(ranks):
    for result in ranks:
        message = result["loop"]["refusal"]
        assert "fsdp2" in message and "'lora'" in message and "--parallel ddp" in message and "\n" not in message


def test_diagnosis_under_fsdp2_is_refused_in_one_line_before_any_work():
    """Diagnosing runs on process rank 0 alone; a model sharded over every rank would hang it."""
    from velora.integrations.fsdp2 import check_parallel
    from velora.methods.registry import parse_method
    from velora.training.config import TrainConfig

    options = TrainConfig(method="galore+velora").method_options()
    assert check_parallel("fsdp2", parse_method("galore+velora"), options, world=2) is True
    with pytest.raises(ValueError, match=r"^--diagnose-every 50 diagnoses on process rank 0 alone, .* "
                                         r"--parallel ddp \(the default\)$"):
        check_parallel("fsdp2", parse_method("galore+velora"), options, world=2, diagnose_every=50)
    assert check_parallel("ddp", parse_method("galore+velora"), options, world=2, diagnose_every=50) is False


def test_an_svd_refresh_that_fails_on_rank_0_stops_every_rank_in_one_line(ranks):
    """Before, only rank 0 raised and the others waited in the broadcast until the group's timeout."""
    first, second = (r["svd_nan"] for r in ranks)
    assert first.startswith("cannot compute an SVD projector of a gradient holding NaN/inf")
    assert second.startswith("the SVD refresh failed on process rank 0") and "\n" not in second
