"""`velora compare` and `velora bench` end to end on a tiny model and a local text file (seconds, not
minutes): the files they promise exist and the JSON has the documented schema."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
from pathlib import Path

import pytest
import torch

from velora.experiments import ablation


@pytest.mark.slow
def test_compare_writes_table_json_and_png(tmp_path, text_file, capsys, monkeypatch):
    from velora.cli import main

    monkeypatch.setenv("VELORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "compare"
    code = main(["compare", "--model", "llama-tiny", "--steps", "3", "--methods", "full,velora,galore",
                 "--rank", "16", "--data", str(text_file), "--seq-len", "32", "--out", str(out), "--jobs", "1",
                 "--json", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in summary["rows"]] == ["full", "velora", "galore"]
    for row in summary["rows"]:
        assert {"method", "val_ppl", "activation_bytes", "peak_bytes", "step_time_ratio"} <= row.keys()
        assert row["val_ppl"] > 1 and row["peak_bytes"] > row["activation_bytes"] > 0
    full, velora, galore = summary["rows"]
    assert full["step_time_ratio"] == 1.0
    assert velora["activation_bytes"] < full["activation_bytes"]  # down_proj inputs are compressed
    assert galore["peak_breakdown"]["optimizer_state"] < full["peak_breakdown"]["optimizer_state"]
    assert summary["learning_rates"]["velora"] == summary["learning_rates"]["full"]
    assert (out / "results.json").exists() and (out / "compare.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "| full |" in md and "VeLoRA Tab. 4" in md and "tuned at 1000 x 5 x 128" in md
    env = summary["environment"]
    assert env["cpu_model"] and env["packages"]["torch"] == torch.__version__
    assert {"transformers", "peft", "tokenizers"} <= {k for k, v in env["packages"].items() if v}
    assert len(env["python_stdlib_sha256"]) == 64 and "bitwise only on the same CPU model" in md
    # a second run with other arguments into the same folder is refused in one line; --fresh replaces it
    other = ["compare", "--model", "llama-tiny", "--steps", "2", "--methods", "full", "--data", str(text_file),
             "--seq-len", "32", "--out", str(out), "--no-progress"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "holds a velora compare with other arguments (rank (16 -> 64); steps (3 -> 2))" in err
    assert err.count("\n") == 1
    assert json.loads((out / "results.json").read_text())["setting"]["steps"] == 3  # untouched
    assert main([*other, "--fresh"]) == 0
    assert "velora compare" in capsys.readouterr().out
    assert not (out / "runs" / "velora").exists()
    assert json.loads((out / "results.json").read_text())["setting"]["steps"] == 2


def test_compare_rerun_reuses_finished_methods(tmp_path, text_file, capsys, monkeypatch):
    """A run stopped by a failing method keeps the finished ones' table; the same command (the failing lr
    fixed) reuses them without retraining and trains the rest."""
    from velora.cli import main
    from velora.experiments import compare
    from velora.training.loop import TrainingDiverged

    monkeypatch.setenv("VELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compare, "PLAIN_PROGRESS_EVERY_S", 0.0)
    out = tmp_path / "out"
    args = ["compare", "--model", "llama-tiny", "--steps", "4", "--methods", "full,velora", "--data", str(text_file),
            "--seq-len", "32", "--out", str(out), "--jobs", "1"]
    with pytest.raises(TrainingDiverged):
        main([*args, "--lr", "velora=1e30"])
    err = capsys.readouterr().err
    assert err.index("progress: no method running yet") < err.index("[1/2] full")  # shown before training
    assert re.search(r"progress: full \d/4 loss \d+\.\d{3} ETA (\d+m)?\d+s", err) and "runs/<method>/log.csv" in err
    partial = json.loads((out / "results.json").read_text())
    assert (partial["complete"], partial["missing"], [r["method"] for r in partial["rows"]]) == (
        False, ["velora"], ["full"])
    assert "**Partial:** 1 of 2 methods finished" in (out / "results.md").read_text()
    stamp = (out / "runs" / "full" / "result.json").stat().st_mtime_ns
    full_log = (out / "runs" / "full" / "log.csv").read_text()

    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "full: reusing the finished run in" in captured.err and "[1/1] velora" in captured.err  # only velora trains
    assert (out / "runs" / "full" / "result.json").stat().st_mtime_ns == stamp  # not retrained
    assert (out / "runs" / "full" / "log.csv").read_text() == full_log
    assert summary["complete"] and summary["reused"] == ["full"]
    assert [(r["method"], r["reused"]) for r in summary["rows"]] == [("full", True), ("velora", False)]
    assert summary["rows"][0]["val_ppl"] == partial["rows"][0]["val_ppl"]
    assert "Reused from an earlier run" in (out / "results.md").read_text()
    # a finished method's options are part of the arguments: changing its lr is refused
    assert main([*args, "--lr", "full=1e-3"]) == 2
    assert "full.lr (0.002 -> 0.001)" in capsys.readouterr().err


def test_compare_refuses_a_foreign_folder(tmp_path, capsys):
    from velora.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["compare", "--out", str(tmp_path), "--fresh"]) == 2
    assert "is not a velora compare folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_progress_board_plain_lines_and_live_table():
    from velora.experiments.progress import MethodState, ProgressBoard

    stream = io.StringIO()
    board = ProgressBoard([MethodState("full", 10, Path("o/runs/full/log.csv")),
                           MethodState("velora", 10, Path("o/runs/velora/log.csv"))],
                          stream=stream, live=False, plain_every_s=0.0)
    board.start()
    board.running("full")
    board.step("full", {"step": 4, "loss": 3.25, "elapsed_s": 8.0})
    board.done("full", "done: val ppl 9.00")
    board.stop()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "progress: no method running yet (0 done, 2 queued; per-step logs in o/runs/<method>/log.csv)"
    assert re.fullmatch(r"progress: full 4/10 loss 3\.250 ETA 12s \(0 done, 1 queued; .*\)", lines[2])
    assert lines[-1].startswith("progress: no method running yet (1 done, 1 queued")
    live = io.StringIO()
    board = ProgressBoard([MethodState("lora", 8, Path("o/runs/lora/log.csv"))], stream=live, live=True)
    board.start()
    board.running("lora")
    board.step("lora", {"step": 2, "loss": 1.5})
    board.stop()
    assert re.search(r"lora\s+.\s+running\s+.\s+2/8\s+.\s+1\.500", live.getvalue())


@pytest.mark.slow
def test_compare_numbers_do_not_depend_on_jobs(tmp_path, text_file, capsys, monkeypatch):
    """Two worker processes give bitwise the same curves as one process running the methods in turn; the
    slowest method (flora, of these three; no peft import in the workers) is started first, and the table keeps the
    --methods order."""
    from velora.cli import main
    from velora.experiments import compare

    monkeypatch.setenv("VELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compare, "PLAIN_PROGRESS_EVERY_S", 0.0)
    summaries = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        assert main(["compare", "--model", "llama-tiny", "--steps", "4", "--methods", "full,velora,flora",
                     "--rank", "8", "--data", str(text_file), "--seq-len", "32", "--out", str(out), "--jobs", str(jobs),
                     "--json"]) == 0
        log = capsys.readouterr().err
        summaries[jobs] = json.loads((out / "results.json").read_text())
    # the workers' first steps reach the one progress display of the parent
    assert re.search(r"progress: (full|velora|flora) [1-4]/4 loss \d+\.\d{3} ETA (\d+m)?\d+s", log), log
    assert log.index("started flora") < log.index("started full") < log.index("started velora")
    serial, parallel = summaries[1]["rows"], summaries[2]["rows"]
    assert [r["method"] for r in parallel] == [r["method"] for r in serial] == ["full", "velora", "flora"]
    for one, two in zip(serial, parallel, strict=True):
        assert one["loss_curve"] == two["loss_curve"] and len(one["loss_curve"]) == 4
        assert one["val_ppl"] == two["val_ppl"] and one["activation_bytes"] == two["activation_bytes"]
    assert serial[0]["val_ppl"] != serial[1]["val_ppl"]  # the methods really differ (the check can fail)
    assert (summaries[1]["jobs"], summaries[2]["jobs"]) == (1, 2)
    assert "while 2 jobs of 1 thread ran at once" in summaries[2]["timing_note"]


@pytest.mark.slow
def test_a_failing_job_on_a_worker_stops_the_queue_and_is_raised_with_its_method(tmp_path, text_file, monkeypatch):
    """A job that diverges on a spawned worker comes back as the same exception type, its message prefixed with
    the method and the worker's traceback attached; the queue stops there (the next job never starts) and the
    worker is gone. One worker keeps the test to one fresh interpreter: stopping a busy second worker is the
    Ctrl-C test's path, and compare's handling of the raised error is the rerun test's."""
    from velora.experiments.compare_jobs import Job, run_parallel
    from velora.training.loop import TrainConfig, TrainingDiverged, load_data

    monkeypatch.setenv("VELORA_CACHE", str(tmp_path / "cache"))  # the worker inherits the environment
    configs = {method: TrainConfig(method=method, model="llama-tiny", data=str(text_file), tokenizer="byte",
                                   steps=3, batch_size=2, seq_len=32, warmup_steps=1, eval_batches=1, lr=lr)
               for method, lr in (("velora", 1e30), ("full", 2e-3))}
    load_data(configs["full"])  # the token cache, as compare builds it before starting workers
    jobs = [Job(method, config, tmp_path / method, threads=1, progress=False) for method, config in configs.items()]
    said: list[str] = []
    with pytest.raises(TrainingDiverged, match="method velora: training stopped: loss is nan") as raised:
        run_parallel(jobs, 1, said.append)
    assert any("traceback in the worker process of velora" in note for note in raised.value.__notes__)
    assert [line.split(" (")[0] for line in said] == ["started velora"]  # full was never sent
    assert not (tmp_path / "full" / "result.json").exists()
    assert multiprocessing.active_children() == []  # the worker was stopped and joined


def test_a_ctrl_c_held_back_while_workers_start_stops_every_started_worker(monkeypatch):
    """The Ctrl-C that the start-up holds back is delivered when SIGINT is unblocked: run_parallel raises it and
    stops the workers it started (still importing: terminated, not waited for), leaving no process behind."""
    import contextlib
    import time

    from velora.experiments import compare_jobs

    real = compare_jobs._sigint_blocked

    @contextlib.contextmanager
    def pressed_during_start_up():
        with real():
            yield
        raise KeyboardInterrupt  # what the pending SIGINT does on leaving the block

    monkeypatch.setattr(compare_jobs, "_sigint_blocked", pressed_during_start_up)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        compare_jobs.run_parallel([], 2, lambda line: None)
    assert multiprocessing.active_children() == []
    assert time.perf_counter() - started < 5  # a worker left to finish its imports would take ~10 s


def test_compare_rejects_bad_jobs(tmp_path, capsys):
    from velora.cli import main

    assert main(["compare", "--jobs", "0", "--out", str(tmp_path)]) == 2
    assert "--jobs 0 must be >= 1" in capsys.readouterr().err


def test_compare_rejects_bad_lr_override(tmp_path, capsys):
    from velora.cli import main

    assert main(["compare", "--lr", "velora:1e-3", "--out", str(tmp_path)]) == 2
    assert "METHOD=LR" in capsys.readouterr().err


@pytest.fixture
def tiny_ablation(monkeypatch, tmp_path, text_file):
    """Shrink the shared base / fine-tuning settings to llama-tiny on a local file."""
    monkeypatch.setenv("VELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(ablation.BASE, "model", "llama-tiny")
    monkeypatch.setitem(ablation.BASE, "data", str(text_file))
    monkeypatch.setitem(ablation.BASE, "vocab_size", 512)
    monkeypatch.setitem(ablation.BASE, "seq_len", 32)
    monkeypatch.setitem(ablation.BASE, "eval_batches", 1)
    monkeypatch.setitem(ablation.FINETUNE, "model", "llama-tiny")
    monkeypatch.setitem(ablation.FINETUNE, "data", str(text_file))
    monkeypatch.setitem(ablation.FINETUNE, "seq_len", 32)
    monkeypatch.setitem(ablation.FINETUNE, "eval_batches", 1)


@pytest.mark.slow
def test_bench_subtoken_reuses_base_and_reports_memory_ordering(tmp_path, tiny_ablation, capsys):
    from velora.cli import main

    out = tmp_path / "bench" / "subtoken"
    args = ["bench", "subtoken", "--steps", "2", "--base-steps", "2", "--out", str(out), "--json", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    sizes = [r["activation_bytes"] for r in summary["rows"]]
    # LoRA alone keeps the most; then a larger sub-token M (fewer groups) keeps fewer scalars
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3] > sizes[4]
    # issue 17's control row: the compressed LoRA-A weights frozen, read against VeLoRA in the verdict
    assert summary["rows"][-1]["label"] == "v+down frozen (control)" and "Control (v+down frozen" in summary["verdict"]
    assert summary["paper"]["rows"][1] == ["D/32", 779, 39.5]
    assert (out / "subtoken.png").exists() and "Paper (VeLoRA Tab. 5b" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["runtime_s"] == summary["runtime_s"] > 0
    stamp = (tmp_path / "bench" / "shared" / "base" / "result.json").stat().st_mtime_ns
    assert main(args) == 0  # the base model is reused, not retrained
    assert (tmp_path / "bench" / "shared" / "base" / "result.json").stat().st_mtime_ns == stamp
    assert "reusing the pre-trained base model" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_flora_rank_buffers_shrink_with_rank(tmp_path, tiny_ablation, capsys, monkeypatch):
    from velora.cli import main
    from velora.experiments import flora_rank

    monkeypatch.setattr(flora_rank, "ACCUMULATION", 2)  # tiny setting (the paper's 16): 28 runs, table shape only
    monkeypatch.setattr(flora_rank, "SEEDS", (0, 1))  # the key rows' repeat seeds (the bench's 3): the same code path
    out = tmp_path / "bench" / "flora-rank"
    assert main(["bench", "flora-rank", "--steps", "2", "--base-steps", "2", "--out", str(out), "--json",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = summary["rows"]
    buffers = [r["accumulation_buffer_bytes"] for r in rows[1:]]
    assert rows[0]["accumulation_buffer_bytes"] is None
    # the paper's protocol: the lr is swept on plain accumulation and its best goes to every FLoRA row
    sweep = summary["setting"]["sweep"]
    for optimizer in ("adafactor", "adamw"):
        tried = [s for s in sweep if s["label"].startswith(optimizer)]
        best = min(tried, key=lambda s: s["val_ppl"])
        assert len(tried) == 3
        chosen = [r for r in rows if r["optimizer"] == optimizer]
        assert chosen[0]["rank"] == "–" and chosen[0]["val_ppl"] == best["val_ppl"]
        assert {r["lr"] for r in chosen} == {best["lr"]}
    # every run is scored on the whole validation split, by its checkpoint of lowest validation loss (FLoRA §3.2)
    for r in rows + sweep:
        run = out / "runs" / "".join(c if c.isalnum() else "-" for c in r["label"].lower()).strip("-")
        config = json.loads((run / "config.json").read_text())
        assert config["eval_batches"] == 0 and config["eval_every"] == 1 and config["accumulation_steps"] == 2
    for r in rows:
        assert [h["step"] for h in r["val_history"]] == [1, 2]
        assert r["val_ppl"] == min(h["val_ppl"] for h in r["val_history"])
        assert r["final_val_ppl"] == r["val_history"][-1]["val_ppl"]
        assert r["best_step"] == min(r["val_history"], key=lambda h: h["val_loss"])["step"]
    assert [(r["rank"], r["orthogonal"]) for r in rows if r["optimizer"] == "adamw"] == [
        ("–", False), (32, False), (64, False), (32, True), (64, True)]
    # the key rows ran with every seed, each against the plain run of its own seed; the others with seed 0 only
    for r in rows[1:]:
        key_row = r["rank"] in (32, 64) and r["side"] == "smaller"
        assert (len(r["gap_by_seed"]) == 2) == key_row, r["label"]
        if key_row:
            assert r["mean_gap"] == sum(r["gap_by_seed"].values()) / 2
    assert buffers[:3] == sorted(buffers[:3])  # r = 8, 16, 32 < d = 64: every 2-D weight compressed
    # r = 64 = d with the smaller side projected: no weight would save memory, so none is compressed
    assert rows[4]["rank"] == 64 and rows[4]["side"] == "smaller" and rows[4]["naive_accumulation_bytes"] == 0
    assert all(r["accumulation_buffer_bytes"] < r["naive_accumulation_bytes"] for r in rows[1:]
               if r["naive_accumulation_bytes"])
    # the larger side keeps min(n, m) x r instead of max(n, m) x r: smaller buffers at the same rank
    by_setting = {(r["rank"], r["side"], r["orthogonal"]): r["accumulation_buffer_bytes"] for r in rows[1:]}
    assert by_setting[(32, "larger", False)] < by_setting[(32, "smaller", False)]


@pytest.mark.slow
def test_ctrl_c_stops_compare_in_one_line_and_the_rerun_continues(tmp_path, text_file):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once both workers are started: one line
    saying what was kept, exit 130, no worker traceback and no worker left running (the re-run's reuse is the test
    above). The workers hold SIGINT blocked from birth, so where they are (importing, training) does not matter; the
    signal is sent while they import, which keeps this test to seconds."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "VELORA_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "velora", "compare", "--model", "llama-tiny", "--methods", "full,velora",
               "--data", str(text_file), "--seq-len", "32", "--out", str(out), "--jobs", "2", "--no-progress",
               "--steps", "20000"]  # far more steps than it runs before the signal: no method can finish first
    # SIG_DFL in the child: a shell's background job (CI may run as one) inherits SIGINT ignored, and Python then
    # never turns it into KeyboardInterrupt
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        said = []
        while not said or "2 of 2 jobs running" not in said[-1]:
            said.append(first.stderr.readline())
            assert said[-1], "".join(said)  # the parent ended before starting both workers
        workers = subprocess.run(["pgrep", "-P", str(first.pid), "-f", "multiprocessing"], capture_output=True,
                                 text=True).stdout.split()
        blocked = [int(line.split()[1], 16) & (1 << (signal.SIGINT - 1))  # Linux: the mask is in /proc
                   for pid in workers if os.path.exists(f"/proc/{pid}/status")
                   for line in open(f"/proc/{pid}/status") if line.startswith("SigBlk:")]
        os.killpg(first.pid, signal.SIGINT)
        err = "".join(said) + first.communicate(timeout=60)[1]
    finally:
        if first.poll() is None:  # never leave a 20000-step run behind
            os.killpg(first.pid, signal.SIGKILL)
    if os.path.exists("/proc/self/status"):
        assert len(blocked) >= 2 and all(blocked), (workers, blocked)  # each worker was born with SIGINT blocked
    assert first.returncode == 130, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "KeyboardInterrupt" not in err, err
    assert "velora compare: stopped; the methods that finished are kept in" in err
    import time

    deadline = time.monotonic() + 10.0  # multiprocessing's resource tracker (a child of the parent) notices the
    while True:  # parent's exit and leaves a few milliseconds after it: wait for stragglers, fail on a real leak
        alive = [line for line in subprocess.run(["pgrep", "-a", "-s", str(first.pid)], capture_output=True,
                                                 text=True).stdout.splitlines() if "<defunct>" not in line]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert alive == [], f"worker processes left running: {alive}"


def test_bench_flora_kappa_rows_build_the_momentum_options_they_name():
    # every FLoRA row's optimizer, built from the row's config as the bench trains it (no training: options only)
    from velora.experiments import flora_kappa
    from velora.methods.registry import build_optimizer, prepare_model
    from velora.optim.flora import PAPER_ALG2
    from velora.training.models import build_config, build_model

    variants = flora_kappa.build_variants(steps=2)
    assert [v.columns["momentum_options"] for v in variants[5:]] == list(flora_kappa.MOMENTUM_OPTIONS)
    keys = ("momentum", "exact_current", "orthogonal", "residual")
    expected = {"Alg. 2": PAPER_ALG2,
                "Flora's defaults (update, current exact, orthonormal rows)": dict(
                    momentum="update", exact_current=True, orthogonal=True, residual=False),
                "residual (gradient, current exact, orthonormal rows)": dict(
                    momentum="gradient", exact_current=True, orthogonal=True, residual=True),
                "orthonormal rows": {**PAPER_ALG2, "orthogonal": True},
                "momentum=update": {**PAPER_ALG2, "momentum": "update"}}
    model = build_model(build_config("llama-tiny", vocab_size=64))  # d = 64 > r = 32: its matrices are compressed
    for variant in variants[1:]:
        options = variant.config.method_options()
        optimizer = build_optimizer(prepare_model(model, "flora", options), "flora", options)
        group = next(g for g in optimizer.param_groups if g["compress"])
        assert (group["kappa"], group["base"], group["rank"]) == (variant.columns["kappa"], "adamw", flora_kappa.RANK)
        assert group["project"] == variant.columns["side"]
        if variant.columns["momentum_options"] in expected:
            assert {k: group[k] for k in keys} == expected[variant.columns["momentum_options"]], variant.label
