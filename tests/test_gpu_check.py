"""benchmarks/gpu_check.py runs end to end in its CPU dry-run mode and writes its JSON and Markdown table; on the
CPU the planner's qlora emulation (NF4Linear) is checked against a real bitsandbytes step by velora.memory's
tracker."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_writes_json_and_markdown_with_every_section(tmp_path, capsys):
    gpu_check = _load_gpu_check()
    out = tmp_path / "gpu"
    assert gpu_check.main(["--dry-run", "--sections", "step_time,memory_vs_plan", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["environment"]["torch"]
    steps = report["sections"]["step_time"]
    assert steps["status"] == "ok", steps.get("error")
    rows = {row["variant"]: row for row in steps["result"]["rows"]}
    assert len(rows) == 10 and all(row["status"] == "ok" for row in rows.values()), rows
    assert rows["QLoRA + velora-torch VeLoRA"]["saved_ratio"] < 1.0  # VeLoRA keeps fewer bytes than QLoRA
    memory = report["sections"]["memory_vs_plan"]["result"]["rows"]
    assert [row["status"] for row in memory] == ["ok", "ok"], memory
    for row in memory:  # planner (fake tensors, NF4 emulation) vs a real step (bitsandbytes) on the same tracker
        assert 0.9 < row["ratio"] < 1.1, row
    table = (out / "gpu_check.md").read_text()
    assert "(b) CUDA peak vs velora plan" in table and "QLoRA + velora-torch VeLoRA" in table
    printed = capsys.readouterr().out
    assert "[gpu_check] step_time: ok" in printed and "[gpu_check] memory_vs_plan: ok" in printed


def test_a_spent_budget_skips_and_records_the_remaining_sections(tmp_path):
    gpu_check = _load_gpu_check()
    out = tmp_path / "gpu"
    assert gpu_check.main(["--dry-run", "--budget-s", "1e-9", "--sections", "step_time", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["sections"]["step_time"]["status"] == "skipped"


def test_unknown_section_is_refused_in_one_line():
    gpu_check = _load_gpu_check()
    with pytest.raises(SystemExit, match="unknown \\['speed'\\]"):
        gpu_check.main(["--dry-run", "--sections", "speed"])
