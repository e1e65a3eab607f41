"""The planner, measured: (1) validation against real CPU training steps, (2) time and memory of 7B plans.

    python benchmarks/bench_plan.py validate [--models llama-60m gpt2] [--methods full lora ...]
    python benchmarks/bench_plan.py timing [--models llama-7b llama-13b]

validate: for each model/method (fp32, batch 2, seq 256 by default) run two real training steps on CPU
under the peak tracker, then plan the same step on fake tensors, and print both peaks, the activation
category and their differences. As an allocator-level cross-check independent of the tracker, a third
real step runs under a dispatch mode that samples glibc's in-use heap (mallinfo2) after every op; its
rise over the step is printed beside the tracker's rise (it also sees allocator rounding and the
Python objects the step creates, and misses scratch buffers freed inside a kernel).

papers: prints the planner's side of the papers' memory tables for docs/memory.md.

timing: runs ``velora plan --json`` for 7B-scale presets in a fresh process each and reports wall time
and the child's peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from velora.memory import measure_step_peak, plan, training_setup
from velora.memory.planner import load_config

MIB = 2**20
GIB = 2**30


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def in_use() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)  # heap chunks in use + mmapped chunks

    return in_use


class HeapPeak(TorchDispatchMode):
    """Max of glibc's in-use bytes, sampled after every op."""

    def __init__(self, in_use) -> None:
        super().__init__()
        self.in_use = in_use
        self.start = in_use()
        self.peak = self.start

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def validate(models: list[str], methods: list[str], batch: int, seq: int) -> int:
    torch.set_num_threads(2)
    in_use = _heap_reader()
    header = (f"{'model':<10} {'method':<14} {'real peak':>10} {'plan peak':>10} {'Δpeak':>8} "
              f"{'real act':>9} {'plan act':>9} {'Δact':>8} {'rise':>8} {'heap rise':>9} {'Δheap':>7} "
              f"{'real saved':>10} {'plan saved':>10} {'Δsaved':>8} {'real s':>7} {'plan s':>7}")
    print(f"fp32, batch {batch}, seq {seq}; MiB; Δ = plan/real - 1; act = activations at the peak; "
          "rise = tracker peak - live at step start; saved = most bytes saved for backward at once")
    print(header)
    worst = 0.0
    for model in models:
        for spec in methods:
            method, _, optimizer = spec.partition(":")
            optimizer = optimizer or ("adafactor" if method.startswith("flora") else "adamw")
            started = time.perf_counter()
            setup = training_setup(load_config(model), method, optimizer, batch=batch, seq=seq)
            real = measure_step_peak(setup.model, setup.optimizer, setup.step, steps=2)
            real_seconds = time.perf_counter() - started
            heap_rise = rise = float("nan")
            if in_use is not None:
                static = measure_step_peak(setup.model, setup.optimizer, lambda: None, steps=1).peak_bytes
                rise = real.peak_bytes - static
                with HeapPeak(in_use) as heap:
                    setup.step()
                heap_rise = heap.peak - heap.start
            del setup
            started = time.perf_counter()
            planned = plan(model, method, optimizer, batch=batch, seq=seq)
            plan_seconds = time.perf_counter() - started
            d_peak = planned["peak_bytes"] / real.peak_bytes - 1
            real_act, plan_act = real.breakdown["activations"], planned["breakdown"]["activations"]
            d_act = plan_act / real_act - 1 if real_act else 0.0
            real_saved, plan_saved = real.saved_activations_max, planned["saved_activation_bytes"]
            d_saved = plan_saved / real_saved - 1 if real_saved else 0.0
            worst = max(worst, abs(d_peak), abs(d_act), abs(d_saved))
            d_heap = heap_rise / rise - 1 if rise == rise and rise else float("nan")
            print(f"{model:<10} {method + ':' + optimizer:<14} {real.peak_bytes / MIB:10.1f} "
                  f"{planned['peak_bytes'] / MIB:10.1f} {d_peak:+8.3%} {real_act / MIB:9.1f} {plan_act / MIB:9.1f} "
                  f"{d_act:+8.3%} {rise / MIB:8.1f} {heap_rise / MIB:9.1f} {d_heap:+7.1%} "
                  f"{real_saved / MIB:10.1f} {plan_saved / MIB:10.1f} {d_saved:+8.3%} "
                  f"{real_seconds:7.1f} {plan_seconds:7.1f}", flush=True)
    print(f"worst |Δ| of peak/activations/saved: {worst:.3%} (acceptance: 3%)")
    return 0 if worst <= 0.03 else 1


def timing(models: list[str], methods: list[str], batch: int, seq: int, dtype: str) -> int:
    print(f"`velora plan --json`, fresh process each, batch {batch}, seq {seq}, {dtype}, "
          f"torch threads = default (the machine has {torch.get_num_threads()} usable)")
    print(f"{'model':<10} {'method':<16} {'peak GiB':>9} {'wall s':>7} {'plan s':>7} {'max RSS GiB':>11}")
    status = 0
    for model in models:
        for method in methods:
            command = [sys.executable, "-m", "velora", "plan", "--model", model, "--method", method,
                       "--batch", str(batch), "--seq", str(seq), "--dtype", dtype, "--json"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - started
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
            if done.returncode != 0:
                print(f"{model:<10} {method:<16} failed: {done.stderr.strip().splitlines()[-1]}")
                status = 1
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rss_note = "" if rss > before else " (≤ earlier child)"
            print(f"{model:<10} {method:<16} {result['peak_bytes'] / GIB:9.2f} {wall:7.1f} {result['seconds']:7.1f} "
                  f"{rss * 1024 / GIB:11.2f}{rss_note}", flush=True)
            if wall > 30 or rss * 1024 > 2 * GIB:
                status = 1
    return status


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f}"  # the papers report GB


def papers() -> int:
    """The planner's side of the papers' memory tables (markdown), under the assumptions in docs/memory.md."""
    started = time.perf_counter()
    # VeLoRA Tab. 3: LLaMA 7B/13B fine-tuning, QLoRA recipe (all linear layers, r=64), batch 2 x seq 512, bf16
    print("### VeLoRA Tab. 3 (planner: batch 2 x seq 512, bf16, LoRA r=64 on all linears, AdamW)\n")
    print("| model | method | parameters | optimizer state | activations (at peak) | peak | planner s |")
    print("|---|---|---|---|---|---|---|")
    for model, sub_token in (("llama-7b", 32), ("llama-13b", 128)):
        for method in ("lora", "qlora", "qlora+velora"):
            result = plan(model, method, "adamw", batch=2, seq=512, dtype="bf16", lora_rank=64,
                          sub_token_size=sub_token)
            b = result["breakdown"]
            print(f"| {model} | {method} | {_gb(b['parameters'])} | {_gb(b['optimizer_state'])} | "
                  f"{_gb(b['activations'])} | {_gb(result['peak_bytes'])} | {result['seconds']:.0f} |", flush=True)
    # VeLoRA Tab. 6: which layers to compress, activations only, LLaMA-7B QLoRA (adapters on q, k, v, down)
    print("\n### VeLoRA Tab. 6 (planner: LLaMA-7B QLoRA r=64 on q,k,v,down, batch 2 x seq 512, bf16, M=32)\n")
    print("| compressed | activations (at peak) | saved by the forward |")
    print("|---|---|---|")
    adapted = ["q_proj", "k_proj", "v_proj", "down_proj"]
    for targets in ([], ["q_proj"], ["k_proj"], ["v_proj"], ["down_proj"], ["q_proj", "v_proj"],
                    ["v_proj", "down_proj"], ["q_proj", "v_proj", "down_proj"], adapted):
        method = "qlora+velora" if targets else "qlora"
        options = {"velora_target_modules": targets} if targets else {}
        result = plan("llama-7b", method, "adamw", batch=2, seq=512, dtype="bf16", lora_rank=64,
                      lora_targets=adapted, sub_token_size=32, **options)
        print(f"| {'+'.join(t.split('_')[0] for t in targets) or 'none'} | "
              f"{_gb(result['breakdown']['activations'])} | {_gb(result['saved_activation_bytes'])} |", flush=True)
    # VeLoRA Tab. 4: pre-training 60M/130M, on-device memory; GaLore's bf16 recipe, batch not given: 16 x 256
    print("\n### VeLoRA Tab. 4 (planner: bf16, batch 16 x seq 256, AdamW; GaLore/LoRA rank 128/256, M=128 padded)\n")
    print("| model | full | galore | lora | velora |")
    print("|---|---|---|---|---|")
    for model, rank in (("llama-60m", 128), ("llama-130m", 256)):
        cells = []
        for method in ("full", "galore", "lora", "velora"):
            result = plan(model, method, "adamw", batch=16, seq=256, dtype="bf16", galore_rank=rank,
                          lora_rank=rank, sub_token_size=128, velora_pad=True)
            cells.append(_gb(result["peak_bytes"]))
        print(f"| {model} | " + " | ".join(cells) + " |", flush=True)
    # GradNormLoRP Tab. 2: parameters + optimizer state in bf16 (their estimate), and the planner's peak
    print("\n### GradNormLoRP Tab. 2 (planner: bf16, batch 16 x seq 256; cells = params+optimizer state / peak)\n")
    print("| model | full | lora | dora | galore | gradnormlorp |")
    print("|---|---|---|---|---|---|")
    for model, rank in (("llama-60m", 128), ("llama-130m", 256), ("llama-350m", 256), ("llama-1b", 512)):
        cells = []
        for method in ("full", "lora", "dora", "galore", "gradnormlorp"):
            result = plan(model, method, "adamw", batch=16, seq=256, dtype="bf16", galore_rank=rank,
                          lora_rank=rank, gradnorm_rank=rank, gradnorm_proj_rank=rank // 4)
            b = result["breakdown"]
            cells.append(f"{_gb(b['parameters'] + b['optimizer_state'])} / {_gb(result['peak_bytes'])}")
        print(f"| {model} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n(all plans: {time.perf_counter() - started:.0f} s)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    check = sub.add_parser("validate", help="planner vs real CPU steps")
    check.add_argument("--models", nargs="+", default=["llama-60m", "gpt2"])
    check.add_argument("--methods", nargs="+", default=["full", "lora", "velora", "galore", "flora"],
                       help="method[:optimizer]; flora defaults to adafactor, the rest to adamw")
    check.add_argument("--batch", type=int, default=2)
    check.add_argument("--seq", type=int, default=256)
    clock = sub.add_parser("timing", help="wall time and RSS of 7B-scale plans")
    clock.add_argument("--models", nargs="+", default=["llama-7b"])
    clock.add_argument("--methods", nargs="+", default=["full", "lora", "qlora+velora"])
    clock.add_argument("--batch", type=int, default=1)
    clock.add_argument("--seq", type=int, default=512)
    clock.add_argument("--dtype", default="bf16")
    sub.add_parser("papers", help="the planner's side of the papers' memory tables (markdown)")
    args = parser.parse_args()
    if args.part == "papers":
        return papers()
    if args.part == "validate":
        return validate(args.models, args.methods, args.batch, args.seq)
    return timing(args.models, args.methods, args.batch, args.seq, args.dtype)


if __name__ == "__main__":
    raise SystemExit(main())
