"""The planner, measured: (1) validation against real CPU training steps, (2) time and memory of 7B plans.

    python benchmarks/bench_plan.py validate [--models llama-60m gpt2] [--methods full lora ...]
    python benchmarks/bench_plan.py timing [--models llama-7b llama-13b]

validate: for each model/method (fp32, batch 2, seq 256 by default) run two real training steps on CPU
under the peak tracker, then plan the same step on fake tensors, and print both peaks, the activation
category and their differences. As an allocator-level cross-check independent of the tracker, a third
real step runs under a dispatch mode that samples glibc's in-use heap (mallinfo2) after every op; its
rise over the step is printed beside the tracker's rise (it also sees allocator rounding and the
Python objects the step creates, and misses scratch buffers freed inside a kernel).

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
              f"{'real s':>7} {'plan s':>7}")
    print(f"fp32, batch {batch}, seq {seq}; MiB; Δ = plan/real - 1; rise = tracker peak - live at step start")
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
            worst = max(worst, abs(d_peak), abs(d_act))
            d_heap = heap_rise / rise - 1 if rise == rise and rise else float("nan")
            print(f"{model:<10} {method + ':' + optimizer:<14} {real.peak_bytes / MIB:10.1f} "
                  f"{planned['peak_bytes'] / MIB:10.1f} {d_peak:+8.3%} {real_act / MIB:9.1f} {plan_act / MIB:9.1f} "
                  f"{d_act:+8.3%} {rise / MIB:8.1f} {heap_rise / MIB:9.1f} {d_heap:+7.1%} "
                  f"{real_seconds:7.1f} {plan_seconds:7.1f}", flush=True)
    print(f"worst |Δ| of peak/activations: {worst:.3%} (acceptance: 3%)")
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
    args = parser.parse_args()
    if args.part == "validate":
        return validate(args.models, args.methods, args.batch, args.seq)
    return timing(args.models, args.methods, args.batch, args.seq, args.dtype)


if __name__ == "__main__":
    raise SystemExit(main())
