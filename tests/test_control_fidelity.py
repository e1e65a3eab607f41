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


def test_control_refuses_a_model_without_velora():
    with pytest.raises(ValueError, match="no VeLoRA layers"):
        freeze_compressed_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


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
