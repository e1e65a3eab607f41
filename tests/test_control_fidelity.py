"""Issue 17: the frozen control row of the fine-tuning benches, and the fidelity study over training."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch

from velora.experiments.control import control_sentence, freeze_compressed_layers, recovered_share
from velora.experiments.fidelity_study import PAPER, VARIANTS, read_records, render, run_study, study_config
from velora.training.loop import TrainConfig, train


def _tiny(text_file, method: str, **changes) -> TrainConfig:
    settings = dict(method=method, model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32,
                    batch_size=4, steps=3, lr=1e-2, warmup_steps=1, eval_batches=1,
                    velora={"sub_token_size": 16, "target_modules": "paper"})
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.mark.parametrize("method", ["velora", "lora+velora"])
def test_control_freezes_exactly_the_compressed_layers(tmp_path, text_file, method):
    before, frozen = {}, []

    def ready(model):
        before.update({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
        frozen.extend(freeze_compressed_layers(model))

    result = train(_tiny(text_file, method), tmp_path / "run", measure=False, tensorboard=False, memory_check=False,
                   on_model_ready=ready)
    after = dict(result["_model"].named_parameters())
    # full: v_proj/down_proj weights; adapter mode: their LoRA-A weights (4 per 2-layer llama-tiny)
    assert len(frozen) == 4 and all(("lora_A" in name) == (method == "lora+velora") for name in frozen)
    in_frozen = [name for name in before if any(name.startswith(layer + ".") for layer in frozen)]
    others = [name for name in before if name not in in_frozen]
    assert len(in_frozen) == 4 and others
    assert all(torch.equal(after[name], before[name]) for name in in_frozen)  # bitwise as loaded
    changed = [name for name in others if not torch.equal(after[name], before[name])]
    assert changed == others  # every other trainable tensor moved


def test_training_only_the_compressed_layers_moves_those_and_nothing_else(tmp_path, text_file):
    from velora.experiments.control import train_only_compressed_layers

    before, kept = {}, []

    def ready(model):
        before.update({name: p.detach().clone() for name, p in model.named_parameters()})
        kept.extend(train_only_compressed_layers(model))

    result = train(_tiny(text_file, "velora"), tmp_path / "run", measure=False, tensorboard=False,
                   memory_check=False, on_model_ready=ready)
    after = dict(result["_model"].named_parameters())
    assert sorted(kept) == sorted(n for n in before if n.endswith(("v_proj.weight", "down_proj.weight")))
    changed = sorted(name for name in before if not torch.equal(after[name], before[name]))
    assert changed == sorted(kept) and len(kept) == 4  # the 4 compressed weights moved, everything else bitwise
    with pytest.raises(ValueError, match="frozen-control' freezes the only layers"):
        from velora.experiments.fidelity_study import run_one
        run_one(VARIANTS["frozen-control"], 0, tmp_path / "runs", every=1, only_compressed=True)


def test_control_refuses_a_model_without_velora():
    with pytest.raises(ValueError, match="no VeLoRA layers"):
        freeze_compressed_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    from velora.experiments.control import train_only_compressed_layers
    with pytest.raises(ValueError, match="no VeLoRA layers"):
        train_only_compressed_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_recovered_share_and_sentence():
    assert recovered_share(110.0, 120.0, 100.0) == pytest.approx(0.5)  # halfway from frozen to exact
    assert recovered_share(100.0, 120.0, 100.0) == pytest.approx(1.0)
    assert recovered_share(125.0, 120.0, 100.0) == pytest.approx(-0.25)  # worse than frozen
    assert recovered_share(101.0, 100.0, 100.0) is None  # freezing costs nothing: nothing to recover
    rows = [{"label": label, "val_ppl": ppl} for label, ppl in (("v", 110.0), ("c", 120.0), ("ref", 100.0))]
    assert "keeps 50%" in control_sentence(*rows, "LoRA")
    assert "says nothing" in control_sentence(rows[0], {"label": "c", "val_ppl": 100.0}, rows[2], "LoRA")


def test_fidelity_study_paper_row_is_compares_velora_row():
    from velora.experiments.compare import RANK, SETTING, SUB_TOKEN_SIZE, TUNED_LR, UPDATE_GAP, method_overrides

    compare_row = TrainConfig(method="velora", lr=TUNED_LR["velora"], **SETTING,
                              **method_overrides("velora", RANK, SUB_TOKEN_SIZE, UPDATE_GAP))
    assert study_config(VARIANTS[PAPER], SETTING["seed"]).to_dict() == compare_row.to_dict()
    random = study_config(VARIANTS["random"], 2)
    assert random.seed == 2 and random.velora["seed"] == 2 and random.velora["init"] == "random"
    # a variant with its own lr changes that and nothing else of the row it varies
    slower = study_config(VARIANTS["per-group-svd-r8-M32-reest-1-lr1e-3"], 0).to_dict()
    tuned = study_config(VARIANTS["per-group-svd-r8-M32-reest-1"], 0).to_dict()
    assert (slower.pop("lr"), tuned.pop("lr")) == (1e-3, TUNED_LR["velora"]) and slower == tuned
    # a variant with its own base optimizer changes the optimizer option and its lr, nothing else
    adafactor = study_config(VARIANTS["paper-adafactor"], 0).to_dict()
    paper = study_config(VARIANTS[PAPER], 0).to_dict()
    assert adafactor.pop("options") == {"optimizer": "adafactor"} and paper.pop("options") == {}
    assert (adafactor.pop("lr"), paper.pop("lr")) == (3e-2, TUNED_LR["velora"]) and adafactor == paper
    built = study_config(VARIANTS["paper-adafactor"], 0).method_options()
    assert built.optim.name == "adafactor"


def test_fidelity_study_records_resumes_and_renders(tmp_path, text_file):
    tiny = dict(model="llama-tiny", data=str(text_file), tokenizer="byte", seq_len=32, batch_size=4, steps=2,
                eval_batches=1)
    said = []
    records = run_study([PAPER, "svd-r2-M8"], [0], tmp_path, 1, say=said.append, **tiny)
    assert [(r["variant"], r["seed"]) for r in records] == [(PAPER, 0), ("svd-r2-M8", 0)]
    paper, rank2 = records
    assert rank2["activation_bytes"] == paper["activation_bytes"]  # (M, r) = (4, 1) and (8, 2): equal saved bytes
    with open(tmp_path / "diagnose" / "paper-s0.csv") as fh:  # the kept copy of the run's log
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 4  # 2 diagnosed steps x 4 wrapped layers
    assert paper["median_cosine"] == statistics.median(float(r["cosine"]) for r in rows)
    layer = "model.layers.1.mlp.down_proj"
    assert paper["layers"][layer]["cosine"] == statistics.median(float(r["cosine"]) for r in rows
                                                                 if r["layer"] == layer)
    lines = (tmp_path / "runs.jsonl").read_text()
    assert run_study([PAPER, "svd-r2-M8"], [0], tmp_path, 1, say=said.append, **tiny) == records
    assert (tmp_path / "runs.jsonl").read_text() == lines and said[-1] == "svd-r2-M8 seed 0: in " \
        f"{tmp_path / 'runs.jsonl'} already"
    table = render(read_records(tmp_path / "runs.jsonl"))
    assert "| svd-r2-M8 |" in table and "1.000x" in table and "no (" in table and "3 seeds" in table
    assert json.loads(lines.splitlines()[0])["config"]["velora"]["sub_token_size"] == 4
    with pytest.raises(ValueError, match="unknown variant"):
        run_study(["nope"], [0], tmp_path, 1, **tiny)
    # a screening run (stopped at step 1 of 2) is a record of its own, rendered under its own heading
    screened = run_study([PAPER], [0], tmp_path, 1, say=said.append, stop_at_step=1, **tiny)
    assert [r["last_step"] for r in screened] == [2, 2, 1] and screened[-1]["config"] == paper["config"]
    assert "screening: steps 1-1 of 2" in render(screened) and "2 steps (the whole schedule)" in render(screened)
    # the frozen control: trained, not diagnosed (its compressed layers get no update)
    control = run_study(["frozen-control"], [0], tmp_path, 1, say=said.append, **tiny)[-1]
    assert control["median_cosine"] is None and control["layers"] == {} and control["val_ppl"] != paper["val_ppl"]
    assert "| frozen-control |" in render(read_records(tmp_path / "runs.jsonl"))


def test_fidelity_study_refuses_an_option_this_build_lacks(tmp_path, monkeypatch):
    from velora.experiments import fidelity_study

    monkeypatch.setitem(fidelity_study.VARIANTS, "future", fidelity_study.Variant("future", "?", {"no_such": 1}))
    with pytest.raises(ValueError, match=r"no option\(s\) \['no_such'\]"):
        run_study(["future"], [0], tmp_path, 1)


def _fidelity_metrics():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity_metrics.py"
    spec = importlib.util.spec_from_file_location("fidelity_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fidelity_metrics_projection_and_measures_match_their_definitions():
    metrics = _fidelity_metrics()
    generator = torch.Generator().manual_seed(0)
    # D = 32: every rule's M (4, 16, 32) divides it, as on compare's model (128 and 352)
    batches = [(torch.randn(6, 32, generator=generator, dtype=torch.float64),
                torch.randn(40, 32, generator=generator, dtype=torch.float64) + 1.0) for _ in range(4)]
    paper_v = torch.nn.functional.normalize(torch.randn(4, generator=generator, dtype=torch.float64), dim=0)
    gradient, inputs = batches[0]
    # the SVD rule against an independent reference: each group's top-2 right singular vectors of its sub-tokens
    blocks = []
    for g in range(8):
        vh = torch.linalg.svd(inputs[:, 4 * g:4 * g + 4], full_matrices=False).Vh[:2]  # (2, M)
        blocks.append(vh.t() @ vh)  # (M, M)
    torch.testing.assert_close(metrics.projected(gradient, inputs, 4, 2, "svd", paper_v),
                               gradient @ torch.block_diag(*blocks), rtol=0, atol=1e-12)
    paper = torch.block_diag(*[torch.outer(paper_v, paper_v)] * 8)  # (D, D)
    torch.testing.assert_close(metrics.projected(gradient, inputs, 4, 1, "paper", paper_v), gradient @ paper)
    result = metrics.layer_metrics(batches, paper_v)
    exact_mean = sum(g for g, _ in batches) / 4
    kept_mean = exact_mean @ paper
    paper_rule = result["paper: first-batch mean, shared (M=4 r=1)"]
    # a fixed projector only removes: nothing added, and the mean-gradient cosine is the kept norm share
    assert abs(paper_rule["added share"]) < 1e-12
    assert paper_rule["mean-grad cos"] == pytest.approx(float(kept_mean.norm() / exact_mean.norm()), abs=1e-12)
    exact_rule = result["exact (M=4 r=4, 4x bytes)"]
    assert exact_rule["per-batch cos"] == pytest.approx(1.0, abs=1e-12)
    assert exact_rule["mean-grad cos"] == pytest.approx(1.0, abs=1e-12)
    assert exact_rule["signal share"] == pytest.approx(result["exact signal share"], abs=1e-12)
    # a rule read off each batch is not a fixed projector: its added share is not identically zero
    assert abs(result["each batch's per-group SVD (M=4 r=1)"]["added share"]) > 1e-6


def test_a_variant_is_judged_against_the_paper_row_with_its_own_optimizer():
    # the Adafactor option beats the AdamW paper row's ppl but not the Adafactor paper row's: the verdict must say ppl
    def record(variant, seed, ppl, cosine):
        return {"variant": variant, "seed": seed, "val_ppl": ppl, "activation_bytes": 1000, "median_cosine": cosine,
                "layers": {"l": {"cosine": cosine, "energy": 0.5}}, "config": {"steps": 10}, "last_step": 10}

    option = "per-group-svd-r8-M32-reest-1-adafactor"
    records = [record(PAPER, s, 53.0, 0.45) for s in range(3)]
    records += [record("paper-adafactor", s, 49.0, 0.45) for s in range(3)]
    records += [record(option, s, 50.0, 0.95) for s in range(3)]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in render(records).splitlines()
            if line.startswith("| ")}
    assert rows[option][-1].strip(" |") == "no (ppl)"  # against paper-adafactor; against the AdamW row: "yes"
    assert rows[option][6] == "2.11x"
    assert rows["paper-adafactor"][-1].strip(" |") == "–"


def test_paired_difference_is_per_seed_against_the_reference_and_merging_keeps_one_setting(tmp_path):
    import importlib.util
    from pathlib import Path

    from velora.experiments.fidelity_study import paired_difference

    paper = {"seeds": [0, 1, 2, 3], "val_ppl_per_seed": [52.0, 54.0, 53.0, 50.0]}
    row = {"seeds": [1, 2, 4], "val_ppl_per_seed": [55.0, 52.5, 10.0]}  # seed 4 has no paper run: left out
    differences = [55.0 - 54.0, 52.5 - 53.0]
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    half = 12.706 * sd / 2 ** 0.5  # Student's t, 1 degree of freedom, two-sided 95%
    assert paired_difference(row, paper) == (f"{mean:+.2f} ± {sd:.2f} (n=2; 95% CI {mean - half:+.2f} to "
                                             f"{mean + half:+.2f})")
    assert paired_difference(row, paper).endswith("95% CI -9.28 to +9.78)")  # worked by hand
    assert paired_difference({"seeds": [1], "val_ppl_per_seed": [53.0]}, paper) == "-1.00 (n=1)"
    assert paired_difference(paper, paper) == "–" and paired_difference(row, None) == "–"
    assert paired_difference({"seeds": [7], "val_ppl_per_seed": [1.0]}, paper) == "–"

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fidelity.py"
    spec = importlib.util.spec_from_file_location("bench_fidelity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = study_config(VARIANTS[PAPER], 0, model="llama-tiny", steps=2).to_dict()
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, seed, changes in ((first, 0, {}), (second, 1, {}), (second, 0, {"lr": 1.0})):
        folder.mkdir(exist_ok=True)
        record = {"variant": PAPER, "seed": seed, "config": {**config, "seed": seed, **changes}, "val_ppl": 1.0}
        with open(folder / "runs.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
    with pytest.raises(SystemExit, match="differ in their settings"):
        bench.merged_records([first, second])  # b's seed-0 run has another lr
    (second / "runs.jsonl").write_text((second / "runs.jsonl").read_text().splitlines()[0] + "\n")
    assert sorted(r["seed"] for r in bench.merged_records([first, second])) == [0, 1]
    # the same run recorded by a newer study (with "last_step") in the first folder: counted once, the first wins
    newer = {**json.loads((first / "runs.jsonl").read_text()), "last_step": config["steps"], "val_ppl": 2.0}
    third = tmp_path / "c"
    third.mkdir()
    (third / "runs.jsonl").write_text(json.dumps(newer) + "\n")
    merged = bench.merged_records([third, first, second])
    assert sorted(r["seed"] for r in merged) == [0, 1] and [r["val_ppl"] for r in merged if r["seed"] == 0] == [2.0]


def test_a_study_wide_lr_wins_over_compares_and_the_variants():
    from velora.experiments.compare import TUNED_LR

    assert study_config(VARIANTS[PAPER], 0).lr == TUNED_LR["velora"]
    assert study_config(VARIANTS["per-group-svd-r8-M32-reest-1-lr3e-3"], 0).lr == 3e-3
    for name in (PAPER, "per-group-svd-r8-M32-reest-1-lr3e-3"):
        assert study_config(VARIANTS[name], 0, lr=1e-3).lr == 1e-3


def test_with_the_exact_control_in_the_table_every_row_is_also_paired_against_it():
    def record(variant, seed, ppl, cosine):
        return {"variant": variant, "seed": seed, "val_ppl": ppl, "activation_bytes": 1000, "median_cosine": cosine,
                "layers": {"l": {"cosine": cosine, "energy": 0.5}}, "config": {"steps": 10}, "last_step": 10}

    paper = [53.0, 54.0, 52.0]
    exact = [54.0, 53.5, 53.0]
    option = [54.5, 53.0, 53.5]
    records = [record(PAPER, s, p, 0.45) for s, p in enumerate(paper)]
    records += [record("exact-r4-M4", s, p, 1.0) for s, p in enumerate(exact)]
    records += [record("int8-cols-r4-M4", s, p, 1.0) for s, p in enumerate(option)]
    lines = [line for line in render(records).splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    column = header.index("val ppl − exact control, same seed (mean ± sd; 95% CI)")
    differences = [o - e for o, e in zip(option, exact)]  # +0.5, -0.5, +0.5
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    half = 4.303 * sd / 3 ** 0.5  # Student's t, 2 degrees of freedom
    expected = f"{mean:+.2f} ± {sd:.2f} (n=3; 95% CI {mean - half:+.2f} to {mean + half:+.2f})"
    assert rows["int8-cols-r4-M4"][column] == expected
    assert rows["exact-r4-M4"][column] == "–" and rows[PAPER][column].startswith("-0.50 ± ")
    without = render([r for r in records if r["variant"] != "exact-r4-M4"])
    assert "exact control" not in without  # no exact runs: no such column


def test_the_finetune_bench_table_pairs_by_seed_and_its_configs_are_the_benches():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fidelity_finetune.py"
    spec = importlib.util.spec_from_file_location("bench_fidelity_finetune", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from velora.experiments.control import frozen_control

    # the paper row and the control are the fine-tuning benches' own VeLoRA config
    assert bench.VARIANTS["paper"][1] == frozen_control(Path("base"), 80).config.velora
    records = [{"variant": name, "seed": seed, "val_ppl": ppl, "activation_bytes": size, "median_cosine": cosine}
               for name, size, cosine, ppls in (("lora", 1100, None, [10.0, 11.0]), ("paper", 1000, 0.5, [11.0, 12.5]),
                                               ("int8-r4", 1001, 0.9, [10.5, 12.0]))
               for seed, ppl in enumerate(ppls)]
    rows = {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")]
            for line in bench.table(records).splitlines()[2:]}
    assert rows["int8-r4"][3:6] == ["1.001x", "0.900", "1.80x"]
    assert rows["int8-r4"][7] == "-0.50 ± 0.00 (n=2; 95% CI -0.50 to -0.50)"  # 10.5 - 11, 12 - 12.5
    assert rows["int8-r4"][8].startswith("+0.75 ± ")  # 10.5 - 10, 12 - 11
    assert rows["lora"][4] == "–" and rows["paper"][7] == "–"
