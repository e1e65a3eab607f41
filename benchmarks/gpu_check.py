"""Everything that needs a GPU, in one command on one CUDA GPU (under 8 minutes), written as one JSON and one
Markdown table to ``--out`` (default benchmarks/results/gpu/):

(a) cuda tests   ``python -m pytest -m cuda -q`` in a subprocess: passed / failed / skipped counts
(b) memory       CUDA peak (torch.cuda.max_memory_allocated over one training step after a warm-up step)
                 against ``velora plan``'s predicted peak, llama-60m and llama-350m x {full, velora, lora+velora,
                 qlora, qlora+velora, galore}, bf16, AdamW, batch 4 x seq 512, and the ratio measured / planned
(c) step time    VeLoRA at a GPU-sized workload (LLaMA layers d=2048, 4 layers, ff 5504, 16 heads, seq 2048,
                 batch 2, bf16): full, full+VeLoRA, full+VeLoRA at M=4 with and without 8-bit z (issue 17),
                 peft LoRA, peft LoRA + peft VeLoRA, peft LoRA + velora-torch VeLoRA (also issue 17's r=4
                 per-group 8-bit configuration), QLoRA, QLoRA + VeLoRA; CUDA events, warm-up rounds, round-robin
                 timed rounds, median of the per-round ratios against each variant's baseline, saved-activation
                 bytes

Each section runs in its own try/except (a failure is recorded, the others still run) and prints one status
line; results are rewritten after every section, so a killed run keeps what it finished. ``--budget-s``
(default 420) skips what would start after that many seconds and records it as skipped.

    PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_check.py --out DIR     # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_check.py --dry-run --out /tmp/gc  # CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "gpu")
PLAN_METHODS = ("full", "velora", "lora+velora", "qlora", "qlora+velora", "galore")
MIB = 2**20


@dataclass
class Sizes:
    """What each section runs at; ``dry`` is the CPU smoke size."""

    device: str = "cuda"
    test_paths: tuple[str, ...] = ("tests",)
    test_timeout_s: int = 240
    plan_models: tuple[str, ...] = ("llama-60m", "llama-350m")
    plan_methods: tuple[str, ...] = PLAN_METHODS
    plan_batch: int = 4
    plan_seq: int = 512
    step_work: dict = field(default_factory=lambda: dict(hidden=2048, intermediate=5504, heads=16, layers=4,
                                                         vocab=1024, seq=2048, batch=2))
    step_dtype: str = "bfloat16"
    warmup: int = 5
    rounds: int = 20
    steps_per_timing: int = 5  # back-to-back steps between two CUDA events: one step (~20 ms) jittered ~10%


DRY = Sizes(device="cpu", test_paths=("tests/test_device.py",), test_timeout_s=120,
            plan_models=("llama-tiny",), plan_methods=("full", "qlora+velora"), plan_batch=2, plan_seq=32,
            step_work=dict(hidden=64, intermediate=192, heads=2, layers=1, vocab=128, seq=32, batch=1),
            step_dtype="float32", warmup=0, rounds=1, steps_per_timing=1)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.used()


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


def environment(sizes: Sizes) -> dict:
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": sizes.device}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - recorded, the sections that need it fail on their own
            info[name] = f"unavailable ({one_line(err)})"
    if sizes.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(sizes.device))
        free, total = torch.cuda.mem_get_info(torch.device(sizes.device))
        info["gpu_memory_gib"] = round(total / 2**30, 1)
    else:
        info["gpu"] = "none (CPU dry run)"
    return info


# ---- (a) the cuda-marked tests ----------------------------------------------------------------------


def _junit_counts(path: str) -> dict[str, int]:
    """passed / failed / errors / skipped from pytest's JUnit XML (the -q summary line is suppressed by the
    project's own addopts -q)."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors",
                                                                               "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def _files_with_cuda_tests(paths: tuple[str, ...]) -> list[str]:
    """The test files under ``paths`` (relative to the repository) that mark a test ``cuda``."""
    found = []
    for path in paths:
        full = os.path.join(ROOT, path)
        files = [full] if os.path.isfile(full) else [os.path.join(dirpath, name) for dirpath, _, names in
                                                      sorted(os.walk(full)) for name in sorted(names)
                                                      if name.startswith("test_") and name.endswith(".py")]
        for file in files:
            with open(file) as fh:
                if "mark.cuda" in fh.read():
                    found.append(os.path.relpath(file, ROOT))
    if not found:
        raise ValueError(f"no test file under {list(paths)} marks a test cuda")
    return found


def cuda_tests(sizes: Sizes, budget: Budget) -> dict:
    import tempfile

    timeout = max(10, min(sizes.test_timeout_s, int(budget.left())))
    # this checkout's src first, whatever PYTHONPATH held (e.g. /tmp/site for peft and bitsandbytes) after it
    paths = [os.path.join(ROOT, "src")] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    test_paths = _files_with_cuda_tests(sizes.test_paths)
    with tempfile.TemporaryDirectory() as scratch:
        junit = os.path.join(scratch, "junit.xml")
        # only the files that hold cuda tests, and a module that fails to import (an optional package missing on
        # the GPU machine) must not stop the others
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE",
                   "--continue-on-collection-errors", f"--junitxml={junit}", *test_paths]
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            output, returncode = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as err:
            output = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            returncode = f"timeout after {timeout}s"
        counts = _junit_counts(junit) if os.path.exists(junit) else {}
    summary = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
               f"{counts['skipped']} skipped" if counts else f"no result (return code {returncode})")
    return {"command": " ".join(["python", *command[1:-len(test_paths) - 1], *test_paths]),
            "returncode": returncode, **counts, "output_tail": output[-3000:], "summary": summary}


# ---- (b) CUDA peak vs the planner ------------------------------------------------------------------


def _plan_options(config) -> dict:
    """VeLoRA's sub-token size: 32 (the paper's) where it divides every layer width, else 16 (llama-350m's
    intermediate 2736 is 16·171)."""
    widths = (config.hidden_size, config.intermediate_size)
    return {"sub_token_size": 32 if all(w % 32 == 0 for w in widths) else 16}


def _real_step_peak(model_name: str, method: str, sizes: Sizes) -> dict:
    """Peak bytes of one bf16 training step after a warm-up step: torch.cuda.max_memory_allocated on CUDA
    (minus what was allocated before the model existed), velora.memory's tracker on the CPU dry run."""
    from velora.memory.planner import _method_options
    from velora.methods.registry import build_optimizer, prepare_model
    from velora.training.models import build_config, build_model

    device = torch.device(sizes.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        floor = torch.cuda.memory_allocated(device)
    config = build_config(model_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(config, dtype=torch.bfloat16)
    options = _method_options("adamw", _plan_options(config))  # exactly what the planner builds
    model = prepare_model(model, method, options)
    optimizer = build_optimizer(model, method, options)
    ids = torch.randint(0, config.vocab_size, (sizes.plan_batch, sizes.plan_seq), device=device)  # (B, T)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type != "cuda":
        from velora.memory import measure_step_peak

        return {"measured_bytes": int(measure_step_peak(model, optimizer, step, steps=2).peak_bytes),
                "measured_by": "velora.memory tracker (CPU)"}
    step()  # warm-up: optimizer state, VeLoRA's v, cuBLAS workspace
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"measured_bytes": int(peak - floor), "measured_absolute_bytes": int(peak), "floor_bytes": int(floor),
            "measured_by": "torch.cuda.max_memory_allocated"}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_vs_plan(sizes: Sizes, budget: Budget) -> dict:
    from velora.memory.planner import plan

    rows = []
    for model_name in sizes.plan_models:
        slowest = 0.0  # the slowest row of this model so far: a row that would overrun the budget is skipped
        for method in sizes.plan_methods:
            row = {"model": model_name, "method": method, "batch": sizes.plan_batch, "seq": sizes.plan_seq,
                   "dtype": "bf16"}
            rows.append(row)
            if budget.left() < max(20.0, 1.5 * slowest):
                row["status"] = "skipped (budget)"
                continue
            started = time.perf_counter()
            try:
                from velora.training.models import build_config

                options = _plan_options(build_config(model_name))
                row["sub_token_size"] = options["sub_token_size"]
                predicted = plan(model_name, method, "adamw", batch=sizes.plan_batch, seq=sizes.plan_seq,
                                 dtype="bf16", **options)
                row["plan_seconds"] = predicted["seconds"]
                row["planned_bytes"] = predicted["peak_bytes"]
                row["planned_breakdown"] = predicted["breakdown"]
                row.update(_real_step_peak(model_name, method, sizes))
                row["ratio"] = row["measured_bytes"] / row["planned_bytes"]
                row["status"] = "ok"
            except Exception as err:  # noqa: BLE001 - one row's failure is recorded, the rest still run
                row["status"] = f"failed: {one_line(err)}"
                row["traceback"] = traceback.format_exc()[-2000:]
            _release(torch.device(sizes.device))  # the row's model and optimizer are gone once it returns
            row["seconds"] = time.perf_counter() - started
            slowest = max(slowest, row["seconds"])
    ok = [r for r in rows if r["status"] == "ok"]
    ratios = [r["ratio"] for r in ok]
    summary = f"{len(ok)}/{len(rows)} rows" + (f", measured/planned {min(ratios):.2f}-{max(ratios):.2f}"
                                                 if ratios else "")
    return {"rows": rows, "summary": summary}


# ---- (c) VeLoRA step time at a GPU-sized workload ---------------------------------------------------


def _bench_module():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_velora

    return bench_velora


def step_variants(bench) -> dict[str, tuple[Callable, str]]:
    """name -> (how to build it from the plain model, the baseline its ratios are taken against)."""
    qlora_name = "QLoRA (bitsandbytes NF4 + peft LoRA)"
    return {
        "full": (lambda model, work: model, "full"),
        "full + VeLoRA (v_proj, down_proj)": (bench.velora_full, "full"),
        # issue 17's equal-bytes layout against the paper's M = 4: what rounding z to 8 bits costs on a GPU
        "full + VeLoRA M=4 (informative)": (bench.velora_full_m4, "full"),
        "full + VeLoRA M=4, r=4, 8-bit z (informative)": (lambda model, work: bench.velora_full_m4(model, work, 8),
                                                          "full"),
        "peft LoRA": (bench.peft_lora, "peft LoRA"),
        "peft LoRA + peft VeLoRA": (bench.peft_velora, "peft LoRA"),
        "peft LoRA + velora-torch VeLoRA": (bench.velora_adapter, "peft LoRA"),
        "peft LoRA + velora-torch VeLoRA, r=4 per-group 8-bit z (informative)": (
            lambda model, work: bench.velora_adapter(model, work, fidelity=True), "peft LoRA"),
        qlora_name: (bench.qlora, qlora_name),
        "QLoRA + velora-torch VeLoRA": (lambda model, work: bench.qlora(model, work, velora=True), qlora_name),
    }


class _Timer:
    """CUDA events on a GPU (the GPU's own time for the step), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object], repeats: int = 1) -> float:
        """Seconds per call of ``fn``, over ``repeats`` calls in a row."""
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            return (time.perf_counter() - start) / repeats
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / repeats


def step_time(sizes: Sizes, budget: Budget) -> dict:
    bench = _bench_module()
    work = bench.Workload(**sizes.step_work)
    device, dtype = torch.device(sizes.device), getattr(torch, sizes.step_dtype)
    batch = torch.randint(0, work.vocab, (work.batch, work.seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)  # (B, T)
    steps, saved, failed = {}, {}, {}
    for name, (wrap, _base) in step_variants(bench).items():
        try:
            model = wrap(bench.build_base(work, seed=0, dtype=dtype, device=str(device)), work)
            saved[name] = bench.saved_activation_bytes(model, batch)
            steps[name] = bench.make_step(model, batch)
        except Exception as err:  # noqa: BLE001 - recorded; the other variants still run
            failed[name] = one_line(err)
    timer, times = _Timer(device), {name: [] for name in steps}
    for round_index in range(sizes.warmup + sizes.rounds):
        if budget.left() < 10 and round_index > sizes.warmup + 1:
            break  # keep what was timed
        order = list(steps)[::-1] if round_index % 2 else list(steps)
        for name in order:
            elapsed = timer(steps[name], sizes.steps_per_timing)
            if round_index >= sizes.warmup:
                times[name].append(elapsed)
    rows = []
    for name, (_wrap, base) in step_variants(bench).items():
        row = {"variant": name, "baseline": base}
        if name in failed or not times.get(name):
            row["status"] = f"failed: {failed.get(name, 'no timed round')}"
        elif base not in steps:
            row["status"] = f"baseline {base!r} failed"
        else:
            row.update(status="ok", rounds=len(times[name]), step_ms=1e3 * statistics.median(times[name]),
                       step_ratio=statistics.median(a / b for a, b in zip(times[name], times[base])),
                       saved_mib=saved[name] / MIB, saved_ratio=saved[name] / saved[base])
        rows.append(row)
    ok = sum(r["status"] == "ok" for r in rows)
    return {"workload": {**asdict(work), "dtype": sizes.step_dtype, "device": sizes.device,
                         "timing": "CUDA events" if device.type == "cuda" else "perf_counter"},
            "rows": rows, "summary": f"{ok}/{len(rows)} variants timed over {sizes.rounds} rounds of "
                                     f"{sizes.steps_per_timing} steps"}


# ---- report -----------------------------------------------------------------------------------------


def _mib(value) -> str:
    return f"{value / MIB:.0f}" if isinstance(value, (int, float)) else "-"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check — {env.get('gpu')} — {env['date_utc']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}, Python {env['python']}; {report['seconds']:.0f} s in all.", ""]
    for key, title in (("cuda_tests", "(a) cuda-marked tests"), ("step_time", "(c) VeLoRA step time"),
                       ("memory_vs_plan", "(b) CUDA peak vs velora plan")):
        section = report["sections"].get(key, {})
        lines += [f"## {title}: {section.get('status', 'not run')} ({section.get('seconds', 0):.0f} s)", ""]
        data = section.get("result") or {}
        if section.get("error"):
            lines += [f"Error: `{section['error']}`", ""]
        if key == "cuda_tests" and data:
            lines += [f"`{data['command']}` -> {data['summary']} (return code {data['returncode']})", ""]
        if key == "memory_vs_plan" and data:
            lines += ["Batch 4 x seq 512 (dry run: smaller), bf16 weights, AdamW; measured = peak during the second "
                      "step minus what was allocated before the model was built.", "",
                      "| model | method | M | planned (MiB) | measured (MiB) | measured / planned | status |",
                      "|---|---|---:|---:|---:|---:|---|"]
            for r in data["rows"]:
                ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
                lines.append(f"| {r['model']} | {r['method']} | {r.get('sub_token_size', '-')} | "
                             f"{_mib(r.get('planned_bytes'))} | "
                             f"{_mib(r.get('measured_bytes'))} | {ratio} | {r['status'][:80]} |")
            lines.append("")
        if key == "step_time" and data:
            w = data["workload"]
            lines += [f"LLaMA layers d={w['hidden']}, {w['layers']} layers, ff={w['intermediate']}, {w['heads']} "
                      f"heads, vocab {w['vocab']}, seq {w['seq']}, batch {w['batch']}, {w['dtype']}, M="
                      f"{w['sub_token_size']}, LoRA r={w['lora_rank']}; step = zero_grad + forward + backward + "
                      f"AdamW; {w['timing']}; {data['summary']}; ratio = median of per-round ratios.", "",
                      "| variant | vs | step (ms) | step ratio | saved activations (MiB) | saved ratio | status |",
                      "|---|---|---:|---:|---:|---:|---|"]
            for r in data["rows"]:
                if r["status"] != "ok":
                    lines.append(f"| {r['variant']} | {r['baseline']} | - | - | - | - | {r['status'][:80]} |")
                    continue
                lines.append(f"| {r['variant']} | {r['baseline']} | {r['step_ms']:.1f} | {r['step_ratio']:.3f} | "
                             f"{r['saved_mib']:.0f} | {r['saved_ratio']:.3f} | ok |")
            lines.append("")
    return "\n".join(lines)


def write(report: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=2, default=str)),
                       ("gpu_check.md", markdown(report))):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(out, name))


# the planner's tracing is the slow part (CPU-bound): it runs last, so a budget cut costs the fewest results
SECTIONS: dict[str, Callable[[Sizes, Budget], dict]] = {
    "cuda_tests": cuda_tests, "step_time": step_time, "memory_vs_plan": memory_vs_plan}


def run_section(name: str, fn: Callable[[Sizes, Budget], dict], sizes: Sizes, budget: Budget) -> dict:
    if budget.left() <= 0:
        print(f"[gpu_check] {name}: skipped (budget of {budget.seconds:.0f} s spent)", flush=True)
        return {"status": "skipped", "seconds": 0.0, "reason": f"budget of {budget.seconds:.0f} s spent"}
    started = time.perf_counter()
    try:
        result = fn(sizes, budget)
        entry = {"status": "ok", "result": result}
    except Exception as err:  # noqa: BLE001 - the section's failure is recorded and the next one runs
        entry = {"status": "failed", "error": one_line(err), "traceback": traceback.format_exc()[-3000:]}
    entry["seconds"] = time.perf_counter() - started
    detail = entry["result"]["summary"] if entry["status"] == "ok" else entry["error"]
    print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']:.0f} s) {detail}", flush=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="velora-torch GPU check: cuda tests, CUDA peak vs plan, "
                                                 "VeLoRA step time; one JSON + one Markdown table")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for gpu_check.json/.md (default {DEFAULT_OUT})")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="sections that would start after this many seconds are skipped (default 420)")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {list(SECTIONS)}")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds: checks that it all runs")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise SystemExit(f"gpu_check: --sections {args.sections!r}: unknown {unknown}; choose from {list(SECTIONS)}")
    if not args.budget_s > 0:
        raise SystemExit(f"gpu_check: --budget-s={args.budget_s} must be > 0")
    sizes = DRY if args.dry_run else Sizes(device=args.device)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible to torch; run on a GPU machine or pass --dry-run")
    if sizes.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(sizes.device).index or 0)  # torch 2.11 wants an index
    if args.dry_run:
        torch.set_num_threads(1)  # tiny ops: more threads only wait on each other
    budget = Budget(args.budget_s)
    report = {"environment": environment(sizes), "dry_run": args.dry_run, "budget_s": args.budget_s,
              "sections": {}, "seconds": 0.0}
    print(f"[gpu_check] {report['environment'].get('gpu')}, torch {torch.__version__}, out {args.out}", flush=True)
    for name in SECTIONS:
        if name not in chosen:
            continue
        report["sections"][name] = run_section(name, SECTIONS[name], sizes, budget)
        report["seconds"] = budget.used()
        write(report, args.out)
    print(f"[gpu_check] done in {budget.used():.0f} s; wrote {os.path.join(args.out, 'gpu_check.md')} and .json",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
